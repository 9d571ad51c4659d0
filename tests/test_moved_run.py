"""A run folder moved elsewhere keeps its work: later stages find the models it trained, and row
ids name those models by their place in the run, so a rerun reuses every row."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_evals import make_fixture

from selfalign.core.pipeline import RunContext, rebased
from selfalign.core.store import read_jsonl
from selfalign.stages import parse_recipe


def test_rebased_follows_a_recorded_model_into_the_stage_folder_as_it_is_now(tmp_path):
    folder = tmp_path / "new" / "run" / "04-engrave"
    (folder / "adapter").mkdir(parents=True)
    assert rebased("/old/run/04-engrave/adapter", folder) == str(folder / "adapter")
    assert rebased("/old/run/04-engrave/missing", folder) == "/old/run/04-engrave/missing"
    assert rebased("embedded:gemma-3-270m", folder) == "embedded:gemma-3-270m"
    assert rebased(str(tmp_path), folder) == str(tmp_path)  # exists: left as it is


def test_model_key_names_a_run_model_by_its_place_in_the_run(tmp_path):
    recipe = parse_recipe({"name": "t", "model": "tiny:llama", "stages": [{"stage": "eval", "evals": ["hhh"]}]})
    ctx = RunContext(recipe=recipe, run_dir=tmp_path / "r")
    assert ctx.model_key(str(tmp_path / "r" / "04-engrave" / "adapter")) == "run:04-engrave/adapter"
    assert ctx.model_key("tiny:llama") == "tiny:llama"
    assert ctx.model_key(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")


def test_a_moved_run_reuses_its_rows(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{k}", "prompt": p}) + "\n" for k, p in enumerate(
        ["Name three fruits.", "What is a prime number?", "Write a haiku about rain."])))
    recipe = {"name": "moved", "model": "tiny:llama", "seed": 0, "stages": [
        {"stage": "self_align", "prompts": str(prompts),
         "drop_cut_off": False, "sampling": {"max_new_tokens": 8}},
        {"stage": "engrave", "data": "@self_align", "train": {"epochs": 1, "max_length": 128}},
        {"stage": "eval", "name": "eval_aligned", "model": "@engrave", "evals": ["hhh", "behaviour"],
         "scoring": ["likelihood"], "limit": 2, "max_new_tokens": 8},
    ]}
    path = tmp_path / "moved.yaml"
    path.write_text(json.dumps(recipe))
    env = {**os.environ, "SELFALIGN_DATA_DIR": str(make_fixture(tmp_path / "data"))}

    def run(out: Path) -> None:
        done = subprocess.run([sys.executable, "-m", "selfalign.cli", "run", str(path), "--out", str(out)],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    first = tmp_path / "first"
    run(first)
    moved = tmp_path / "elsewhere" / "second"
    moved.parent.mkdir()
    shutil.move(first, moved)
    evals = next(moved.glob("*-eval_aligned"))
    rows_before = {p.relative_to(moved): read_jsonl(p) for p in evals.glob("*/rows.jsonl")}
    assert rows_before and all(rows_before.values())
    (evals / "_done.json").unlink()  # the eval stage runs again, in the moved folder
    run(moved)
    rows_after = {p.relative_to(moved): read_jsonl(p) for p in evals.glob("*/rows.jsonl")}
    assert rows_after == rows_before  # nothing scored or generated twice
    results = json.loads((evals / "results.json").read_text())
    assert results["model"].startswith(str(moved))  # the adapter found where it is now
