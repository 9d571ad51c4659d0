"""Issue #14's kill loop: the quickstart recipe on a tiny model (generation, training, evals), SIGKILLed
once inside each stage in turn, at a random point, then resumed. Every resumed run must end with the
rows, eval metrics and training loss of one uninterrupted run. Slow: one uninterrupted run and one
killed-and-resumed run per stage."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_evals import make_fixture

from selfalign.core.recipe import find_recipe
from selfalign.core.store import read_jsonl

pytestmark = pytest.mark.slow

STAGES = ["eval_base", "self_instruct", "self_align", "engrave", "eval_aligned"]
VOLATILE = {"finished_at", "wall_s", "seconds", "started_at", "model", "data", "tok_per_s", "rows_per_s",
            "cache",  # times, paths, and where the base eval cache sits and whether it answered
            "id"}  # a row id includes its model, here a path inside the run folder (checked for repeats below)


def _recipe(tmp_path: Path) -> Path:
    recipe = yaml.safe_load(find_recipe("quickstart").read_text())
    for stage in recipe["stages"]:
        if stage["stage"] == "eval":
            stage.update(limit=2, max_new_tokens=16)
        if stage["stage"] == "self_align":
            stage.update(chunk=1, drop_cut_off=False)  # rows prompt by prompt; a random model never stops
        if stage["stage"] == "self_instruct":
            stage["sampling"]["max_new_tokens"] = 32
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "selfalign.cli", "run", str(recipe), "--model", "tiny:llama", "--out", str(out),
            "--max-prompts", "4"]


def _stage_dir(out: Path, label: str) -> Path | None:
    found = [p for p in out.glob(f"*-{label}") if p.is_dir()]
    return found[0] if found else None


def _started(out: Path, label: str) -> bool:
    """The stage has begun writing: any file under its folder."""
    folder = _stage_dir(out, label)
    return folder is not None and any(p.is_file() for p in folder.rglob("*"))


def _kill_inside(cmd: list[str], env: dict, out: Path, label: str, rng: random.Random) -> bool:
    """Run until `label` has started, wait a random moment, SIGKILL. False if the run finished first."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while proc.poll() is None and not _started(out, label):
        assert time.monotonic() < deadline, f"{label} never started"
        time.sleep(0.02)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        return False
    time.sleep(rng.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:200]} != {str(b)[:200]}"]


def _outcome(out: Path) -> dict:
    """What a run made: every stage's rows (as a set: order of appends may differ after a resume),
    its done-marker summary and the eval results, without times and paths."""
    got = {}
    for label in STAGES:
        folder = _stage_dir(out, label)
        assert folder is not None and (folder / "_done.json").exists(), f"{label} did not finish"
        raw = [r for f in folder.rglob("rows.jsonl") for r in read_jsonl(f)]
        ids = [r["id"] for r in raw if "id" in r]
        assert len(ids) == len(set(ids)), f"{label}: a row written twice"
        rows = sorted(json.dumps(_strip(r), sort_keys=True) for r in raw)
        done = _strip(json.loads((folder / "_done.json").read_text()))
        results = folder / "results.json"
        got[label] = {"rows": rows, "done": done,
                      "results": _strip(json.loads(results.read_text())) if results.exists() else None}
    return got


def test_a_kill_inside_any_stage_resumes_to_the_uninterrupted_run(tmp_path):
    recipe = _recipe(tmp_path)
    data = str(make_fixture(tmp_path / "data"))

    def env(name: str) -> dict:  # a cache per run: the base model's eval cache must not answer for it
        return {**os.environ, "SELFALIGN_DATA_DIR": data, "SELFALIGN_CACHE": str(tmp_path / f"cache-{name}")}

    whole = tmp_path / "whole"
    res = subprocess.run(_cmd(recipe, whole), env=env("whole"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = _outcome(whole)
    assert expected["engrave"]["done"]["train_loss"] > 0

    rng = random.Random(14)
    killed_in = []
    for label in STAGES:
        out = tmp_path / f"killed-{label}"
        if _kill_inside(_cmd(recipe, out), env(label), out, label, rng):
            killed_in.append(label)
        again = subprocess.run(_cmd(recipe, out), env=env(label), capture_output=True, text=True)
        assert again.returncode == 0, f"resume after a kill in {label}: {again.stderr[-3000:]}"
        got = _outcome(out)
        for stage in STAGES:
            diff = _differences(got[stage], expected[stage])
            assert not diff, f"killed in {label}: {stage} differs from the uninterrupted run: {diff[:5]}"
    assert len(killed_in) >= 3, f"the kill landed inside only {killed_in}"
