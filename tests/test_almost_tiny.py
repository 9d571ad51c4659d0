"""The ALMoST CPU recipe end to end on a tiny in-process model, SIGKILLed during `compare` and
resumed: no response generated twice, every stage finished, the report drawn."""

import json
import os
import subprocess
import sys

import yaml
from killrun import kill_when_written
from test_evals import make_fixture

from selfalign.core.recipe import find_recipe
from selfalign.core.store import read_jsonl


def test_almost_cpu_recipe_end_to_end_with_a_kill_during_compare(tmp_path):
    recipe = yaml.safe_load(find_recipe("almost_cpu").read_text())
    for stage in recipe["stages"]:
        if stage["stage"] == "rlsf":
            stage.update(heldout=2)
            stage["train"] = {**stage.get("train", {}), "max_steps": 2}
        if stage["stage"] == "mine_prompts":
            stage["include_seeds"] = True  # a random tiny model mines little; the seeds keep the run fed
        if stage["stage"] == "eval" and "behaviour" in stage.get("evals", []):
            stage.update(limit=2, max_new_tokens=16)  # 2 items per category or kind: the full sets are slow here
        if stage["stage"] == "compare":
            stage["bad_filter"] = False  # a random model's bytes fail every BAD rule; verdicts are still recorded
    path = tmp_path / "almost.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "SELFALIGN_DATA_DIR": str(make_fixture(tmp_path / "data"))}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfalign.cli", "run", str(path), "--model", "tiny:llama", "--out", str(out),
           "--max-prompts", "6"]
    responses = kill_when_written(cmd, env, out, "*-compare/responses.jsonl", 1, "compare")
    before = read_jsonl(responses)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = read_jsonl(responses)
    keys = [(r["prompt_id"], r["config"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6 * 3  # each prompt answered once by each configuration
    assert rows[: len(before)] == before
    record = json.loads((out / "run.json").read_text())
    assert list(record["stages"]) == ["eval_base", "mine_prompts", "compare", "reward_model", "rm_on_hhh",
                                      "self_play", "sft", "rlsf", "eval_rlsf"]
    pairs = read_jsonl(next(out.glob("*-compare/rows.jsonl")))
    # with bad_filter off, a pair whose chosen reply breaks a BAD rule is kept, its verdict recorded (whether a
    # random model's bytes break a rule is chance: a trimmed reply can end in "." and pass them all)
    assert pairs and all("bad_response" in r for r in pairs) and any(r["kept"] and r["bad_response"] for r in pairs)
    rm_eval = json.loads(next(out.glob("*-rm_on_hhh/results.json")).read_text())
    assert "rm" in rm_eval["evals"]["hhh"]["metrics"]
    rlsf = json.loads(next(out.glob("*-rlsf/_done.json")).read_text())
    after = json.loads(next(out.glob("*-eval_rlsf/results.json")).read_text())
    assert after["model"] == rlsf["model"]
    report = subprocess.run([sys.executable, "-m", "selfalign.cli", "report", str(out)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    html = (out / "report.html").read_text()
    assert "left out" not in report.stderr
    for stage in ("compare", "rlsf"):  # each draws its own section (its name alone is in "What ran" anyway)
        assert f'<section id="stage-{stage}">' in html, f"no report section for {stage}"
