"""The whole quickstart recipe (Self-Align end to end) on a tiny in-process model, killed during
`self_align` and resumed: no prompt answered twice, every stage finished, a report at the end."""

import json
import os
import subprocess
import sys

import yaml
from killrun import kill_when_written
from test_evals import make_fixture

from selfalign.core.recipe import find_recipe
from selfalign.core.store import read_jsonl


def test_quickstart_end_to_end_with_a_kill_during_self_align(tmp_path):
    recipe = yaml.safe_load(find_recipe("quickstart").read_text())
    for stage in recipe["stages"]:
        if stage["stage"] == "self_align":
            stage["chunk"] = 1  # write rows prompt by prompt, so the kill lands half-way
            stage["drop_cut_off"] = False  # a random tiny model never stops: keep its answers to train on
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "SELFALIGN_DATA_DIR": str(make_fixture(tmp_path / "data"))}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfalign.cli", "run", str(path), "--model", "tiny:llama", "--out", str(out),
           "--max-prompts", "6"]
    rows_file = kill_when_written(cmd, env, out, "*-self_align/rows.jsonl", 2, "self_align", poll=0.05)
    assert not (rows_file.parent / "_done.json").exists(), "self_align finished before the kill"
    before = read_jsonl(rows_file)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = read_jsonl(rows_file)
    assert len(rows) == len({r["prompt_id"] for r in rows}) == 6  # every prompt once
    assert rows[: len(before)] == before
    record = json.loads((out / "run.json").read_text())
    assert set(record["stages"]) == {"eval_base", "self_instruct", "self_align", "engrave", "eval_aligned"}
    assert sum(i["lines"] for i in record["inputs"]) > 100  # the supervision budget is counted
    aligned = json.loads(next(out.glob("*-engrave/_done.json")).read_text())["model"]
    assert os.path.exists(os.path.join(aligned, "adapter_config.json"))
    after = json.loads(next(out.glob("*-eval_aligned/results.json")).read_text())
    assert after["model"] == aligned and set(after["evals"]["hhh"]["metrics"]) >= {"likelihood"}
    assert {"behaviour", "truthfulqa", "capability"} <= set(after["evals"])
    report = subprocess.run([sys.executable, "-m", "selfalign.cli", "report", str(out)], capture_output=True, text=True)
    assert report.returncode == 0 and (out / "report.html").exists()
