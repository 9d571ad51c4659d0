"""A finished stage is reused only when its fingerprint (settings, model, files, earlier stages) matches."""

import json

import pytest
from typer.testing import CliRunner

from selfalign.cli import app
from selfalign.core.errors import SelfAlignError
from selfalign.core.fingerprint import changed_fields
from selfalign.core.pipeline import stage_fingerprints
from selfalign.core.store import read_done, read_jsonl
from selfalign.stages import parse_recipe, run_recipe


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Name a colour.\nName a fruit.\n")
    return path


def generate(*args):
    return CliRunner().invoke(app, ["generate", *args], catch_exceptions=True)


def test_generate_into_a_folder_another_model_finished_is_an_error_naming_the_change(tmp_path, prompts):
    out = tmp_path / "gen"
    common = ["--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4"]
    first = generate(*common, "--model", "tiny:llama")
    assert first.exit_code == 0, first.output
    rows = read_jsonl(out / "01-generate" / "rows.jsonl")
    second = generate(*common, "--model", "tiny:gemma3", "--temperature", "0", "--n", "2")
    assert isinstance(second.exception, SelfAlignError), second.output  # not "done earlier, skipped"
    message = str(second.exception)
    assert "\n" not in message and "'tiny:llama' -> 'tiny:gemma3'" in message
    assert "config.sampling.temperature (0.7 -> 0.0)" in message and "--fresh generate" in message
    assert read_jsonl(out / "01-generate" / "rows.jsonl") == rows  # nothing touched
    again = generate(*common, "--model", "tiny:llama")  # the same settings are still reused
    assert again.exit_code == 0 and "done earlier, skipped" in again.output
    fresh = generate(*common, "--model", "tiny:gemma3", "--temperature", "0", "--n", "2", "--fresh", "generate")
    assert fresh.exit_code == 0, fresh.output
    rows = read_jsonl(out / "01-generate" / "rows.jsonl")
    assert len(rows) == 4 and {r["meta"]["model"] for r in rows} == {"tiny:gemma3"}


def recipe(out, prompts, temperature=0.7, name="one"):
    return parse_recipe({"name": name, "model": "tiny:llama", "out": str(out), "stages": [
        {"stage": "generate", "name": "answers", "prompts": str(prompts),
         "sampling": {"max_new_tokens": 4, "temperature": temperature}},
        {"stage": "generate", "name": "more", "prompts": str(prompts), "sampling": {"max_new_tokens": 4}},
    ]})


def test_another_recipe_over_an_old_run_stops_before_anything_runs(tmp_path, prompts):
    out = tmp_path / "run"
    run_recipe(recipe(out, prompts))
    snapshot = (out / "recipe.yaml").read_text()
    with pytest.raises(SelfAlignError, match=r"stage 'answers'.*changed: config.sampling.temperature \(0.7 -> 1.0\)"):
        run_recipe(recipe(out, prompts, temperature=1.0, name="other"))
    assert (out / "recipe.yaml").read_text() == snapshot  # the folder still describes what is in it
    # an edited prompt file is a changed input too
    prompts.write_text("Name a colour.\nName a river.\n")
    with pytest.raises(SelfAlignError, match=r"contents of .*prompts.txt"):
        run_recipe(recipe(out, prompts))
    with pytest.raises(SelfAlignError, match=r"--fresh nope: the recipe has no stage named 'nope'"):
        run_recipe(recipe(out, prompts), fresh=["nope"])
    with pytest.raises(SelfAlignError, match=r"stage 'answers'"):
        run_recipe(recipe(out, prompts), fresh=["more"])  # a later stage's --fresh does not excuse an earlier one
    run_recipe(recipe(out, prompts), fresh=["answers"])  # redoes it and every stage after it
    for folder in ("01-answers", "02-more"):
        assert any("river" in r["prompt"] for r in read_jsonl(out / folder / "rows.jsonl"))
        assert len(read_jsonl(out / folder / "rows.jsonl")) == 2
    run_recipe(recipe(out, prompts))  # and now it is all reused


def test_a_changed_stage_changes_the_fingerprint_of_every_stage_that_reads_it(tmp_path):
    def prints(temperature):
        return stage_fingerprints(parse_recipe({"name": "t", "stages": [
            {"stage": "generate", "name": "gen", "prompts": "builtin:quickstart",
             "sampling": {"temperature": temperature}},
            {"stage": "self_align", "prompts": "@gen"},
            {"stage": "generate", "name": "apart", "prompts": "builtin:quickstart"},
        ]}))

    before, after = prints(0.7), prints(0.5)
    assert before[0][0] != after[0][0] and before[1][0] != after[1][0]  # the stage and the stage reading it
    assert before[2][0] == after[2][0]  # a stage that does not read it keeps its fingerprint
    assert "output of @gen" in changed_fields(before[1][1], after[1][1])


def test_a_field_added_later_is_fingerprinted_only_away_from_the_old_behaviour():
    """An eval stage an older selfalign finished (no `mc2` field then) is still reused after the
    upgrade, since `mc2: true` makes the same rows; `mc2: false` makes other rows and is a change."""
    def prints(**extra):
        return stage_fingerprints(parse_recipe({"name": "t", "stages": [
            {"stage": "eval", "evals": ["truthfulqa"], **extra}]}))[0]

    (default, settings), (true, _), (false, changed) = prints(), prints(mc2=True), prints(mc2=False)
    assert "config.mc2" not in settings and default == true
    assert false != default and changed_fields(settings, changed) == "config.mc2 ('<unset>' -> false)"
    assert "config.evals" in settings  # the other fields are still there


def test_the_engine_dtype_counts_unless_it_is_auto():
    """bfloat16 makes other rows than float32, so it is a change; auto (the default, what every older
    run used) adds nothing, so finished stages keep their fingerprints."""
    def prints(**engine):
        return stage_fingerprints(parse_recipe({"name": "t", "engine": {"name": "hf", **engine},
                                                "stages": [{"stage": "eval", "evals": ["hhh"]}]}))[0]

    (auto, settings), (default, _), (bf16, changed) = prints(dtype="auto"), prints(), prints(dtype="bfloat16")
    assert auto == default and "engine.dtype" not in settings
    assert bf16 != auto and changed_fields(settings, changed) == "engine.dtype ('<unset>' -> 'bfloat16')"
    assert prints(batch_size=3)[0] == auto  # how rows are batched is not what they are


def test_changed_fields_lists_a_few_and_counts_the_rest():
    old = {f"k{i}": i for i in range(6)}
    new = {**{f"k{i}": i + 1 for i in range(6)}, "extra": "x"}
    text = changed_fields(old, new, most=2)
    assert text.startswith("extra ('<unset>' -> 'x'), k0 (0 -> 1)") and text.endswith("and 5 more")


def test_run_json_is_rebuilt_when_missing_and_corrupt_markers_are_one_clear_line(tmp_path, prompts):
    out = tmp_path / "run"
    first = run_recipe(recipe(out, prompts))
    (out / "run.json").write_text('{"name": "one", "sta')  # torn
    with pytest.raises(SelfAlignError, match=r"run.json: line 1, .*delete it and run again") as err:
        run_recipe(recipe(out, prompts))
    assert "\n" not in str(err.value)
    (out / "run.json").unlink()
    again = run_recipe(recipe(out, prompts))
    assert again["stages"]["answers"]["summary"]["rows"] == first["stages"]["answers"]["summary"]["rows"] == 2
    assert json.loads((out / "run.json").read_text())["stages"]["more"]["stage"] == "generate"
    assert read_done(out / "01-answers")["fingerprint"]
    (out / "01-answers" / "_done.json").write_text('{"rows": 2, "fin')
    with pytest.raises(SelfAlignError, match=r"01-answers/_done.json: line 1") as err:
        run_recipe(recipe(out, prompts))
    assert "\n" not in str(err.value)
