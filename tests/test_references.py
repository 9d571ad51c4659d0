"""One resolver for `@label`: models, rows and prompts of earlier stages, checked before anything runs."""

import json

import pytest

from selfalign.core.errors import SelfAlignError
from selfalign.core.pipeline import RunContext
from selfalign.core.recipe import check_references
from selfalign.stages import load_recipe, parse_recipe, run_recipe


def recipe(*stages):
    return parse_recipe({"name": "t", "model": "tiny:llama", "stages": list(stages)})


def test_a_reference_to_a_missing_or_later_stage_fails_at_load(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nstages:\n  - {stage: engrave, data: '@answers'}\n"
                    "  - {stage: generate, name: answers, prompts: x}\n")
    with pytest.raises(SelfAlignError, match=r"r.yaml: stages\[0\].data: @answers names a stage that runs later"):
        load_recipe(path)
    bad = recipe({"stage": "generate", "prompts": "x", "model": "@nowhere"})
    with pytest.raises(SelfAlignError, match=r"stages\[0\].model: @nowhere names no stage of this recipe"):
        check_references(bad)
    with pytest.raises(SelfAlignError, match="@nowhere"):  # and before a run touches the folder
        run_recipe(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # defaults count: verbose_clone reads @engrave and @self_instruct unless told otherwise
    with pytest.raises(SelfAlignError, match=r"stages\[0\].(teacher|prompts): @"):
        check_references(recipe({"stage": "verbose_clone"}))


def test_data_at_label_reads_the_earlier_stages_rows_in_every_field(tmp_path):
    rec = recipe({"stage": "generate", "name": "self_align", "prompts": "x"},
                 {"stage": "engrave", "data": "@self_align"}, {"stage": "reward_model", "data": "@self_align"})
    check_references(rec)
    folder = tmp_path / "01-self_align"
    folder.mkdir()
    rows = [{"id": "a", "prompt": "Hi?", "answer": "Hello.", "kept": True}, {"id": "b", "prompt": "No?", "kept": False}]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = RunContext(recipe=rec, run_dir=tmp_path, stage_dirs={"self_align": folder})
    assert ctx.rows_file("@self_align") == ctx.rows_file("self_align") == folder / "rows.jsonl"
    assert ctx.rows("@self_align") == rows
    assert ctx.prompts("@self_align") == [("a", "Hi?")]  # only kept rows with a prompt
    with pytest.raises(SelfAlignError, match=r"data: @other names no earlier stage \(earlier: self_align\)"):
        ctx.rows_file("@other")
