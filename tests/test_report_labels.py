"""Report details that keep the page readable: short model names in sample columns, tables for short logs."""

from __future__ import annotations

from selfalign.core.report import has_curve, model_label, table_training


def test_a_model_trained_in_the_run_is_named_by_its_stage(tmp_path):
    stage = tmp_path / "05-engrave"
    stage_of = {str(stage.resolve()): "engrave"}
    assert model_label(str(stage.resolve() / "adapter"), stage_of) == "@engrave"
    assert model_label("tiny:llama", stage_of) == "tiny:llama"
    assert model_label(str(tmp_path / "elsewhere" / "adapter"), stage_of) == str(tmp_path / "elsewhere" / "adapter")
    assert model_label(None, stage_of) == ""


def test_few_logged_steps_make_a_table_not_a_curve():
    short = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 2, "train_loss": 2.2}]
    assert not has_curve(short)
    assert has_curve([{"step": i, "loss": 1.0 / i} for i in range(1, 6)])
    html = table_training("engrave", short)
    assert "<td>2.500</td>" in html and "<td>2.000</td>" in html and "train_loss" not in html
    assert table_training("x", [{"step": 1, "epoch": 1.0}]) is None
