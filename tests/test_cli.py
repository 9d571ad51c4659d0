"""The real entry point, run as a user would: as a subprocess, on the tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfalign.core.store import read_jsonl


def cli(*args, env_extra=None, **kw):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "selfalign.cli", *args], capture_output=True, text=True, env=env, **kw)


def test_help_teaches():
    out = cli("--help")
    assert out.returncode == 0
    for cmd in ("run", "generate", "serve", "models"):
        assert cmd in out.stdout
    gen = cli("generate", "--help")
    assert "--prompts" in gen.stdout and "resume" in gen.stdout.lower() or "again" in gen.stdout


SMALL_RECIPE = """
name: small
model: embedded:gemma-3-270m
stages:
  - stage: generate
    name: base_answers
    prompts: builtin:quickstart
    system: A helpful assistant.
    sampling: {temperature: 0.7, max_new_tokens: 24}
"""


def test_run_recipe_on_tiny_model_then_resume_skips(tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(SMALL_RECIPE)
    out = tmp_path / "run"
    args = ("run", str(recipe), "--model", "tiny:llama", "--out", str(out), "--max-prompts", "3")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    rows = read_jsonl(out / "01-base_answers" / "rows.jsonl")
    assert len(rows) == 3
    assert {"id", "prompt_id", "completion", "meta"} <= rows[0].keys()
    assert rows[0]["meta"]["model"] == "tiny:llama" and rows[0]["meta"]["sampling"]["max_new_tokens"] == 24
    record = json.loads((out / "run.json").read_text())
    assert record["stages"]["base_answers"]["summary"]["rows"] == 3
    second = cli(*args)
    assert second.returncode == 0 and "done earlier, skipped" in second.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "no-such-recipe"], "recipe 'no-such-recipe' not found"),
        (["run", "quickstart", "--model", "./missing-model"], "is not a folder, a .gguf file"),
        (["generate", "--prompts", "nope.txt", "--model", "tiny:llama"], "prompt file nope.txt does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(args, expected, tmp_path):
    out = cli(*args, "--out", str(tmp_path / "o"))
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_empty_prompt_file_and_debug_traceback(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    out = cli("generate", "--prompts", str(empty), "--model", "tiny:llama", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "holds no prompts" in out.stderr and "Traceback" not in out.stderr
    dbg = cli("generate", "--prompts", str(empty), "--model", "tiny:llama", "--out", str(tmp_path / "o"), "--debug")
    assert "Traceback" in dbg.stderr


def test_broken_jsonl_prompt_row_names_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": "broken\n')
    out = cli("generate", "--prompts", str(f), "--model", "tiny:llama", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "p.jsonl:2: broken JSON line" in out.stderr


def test_models_lists_references():
    out = cli("models")
    assert out.returncode == 0
    assert "embedded:gemma-3-270m" in out.stderr + out.stdout and "tiny:llama" in out.stderr + out.stdout


def test_stages_lists_every_stage_and_explains_one():
    from selfalign.stages import STAGES

    # The listing goes to stdout, so `selfalign stages | grep quickstart` works (CI relies on it).
    out = cli("stages", env_extra={"COLUMNS": "200"})
    text = out.stdout
    assert out.returncode == 0 and all(name in text for name in STAGES) and "almost_cpu" in text
    one = cli("stages", "compare", env_extra={"COLUMNS": "200"})
    text = one.stdout
    assert one.returncode == 0 and "rubric" in text and "trim_incomplete" in text and "(required)" in text
    bad = cli("stages", "nope")
    assert bad.returncode != 0 and "no stage named 'nope'" in bad.stdout + bad.stderr


def test_generate_killed_half_way_resumes_without_repeats(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt number {i}: tell me something." for i in range(40)) + "\n")
    out = tmp_path / "gen"
    args = [sys.executable, "-m", "selfalign.cli", "generate", "--prompts", str(prompts), "--model", "tiny:llama",
            "--out", str(out), "--batch-size", "1", "--max-new-tokens", "96", "--n", "2"]
    rows_file = out / "01-generate" / "rows.jsonl"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if rows_file.exists() and len(rows_file.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_jsonl(rows_file) if rows_file.read_text().endswith("\n") else None
    assert not (out / "01-generate" / "_done.json").exists(), "finished before it could be killed"
    # simulate the worst case: the kill landed in the middle of a write
    with open(rows_file, "a") as f:
        f.write('{"id": "half-written')
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "half-written row" in again.stderr
    rows = read_jsonl(rows_file)
    keys = [(r["prompt_id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == 80  # every prompt answered, n=2, none twice
    assert len({r["prompt_id"] for r in rows}) == 40
    if partial:  # rows written before the kill are kept byte for byte
        assert rows[: len(partial)] == partial
    assert json.loads((out / "01-generate" / "_done.json").read_text())["rows"] == 80


def test_run_folder_that_is_a_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = cli("run", "quickstart", "--model", "tiny:llama", "--out", str(blocker / "run"))  # fails before any stage
    assert out.returncode == 2 and "blocker" in out.stderr and "Traceback" not in out.stderr


def test_engine_openai_with_no_server_is_clear(tmp_path):
    out = cli("generate", "--prompts", "builtin:quickstart", "--model", "m", "--engine", "openai",
              "--base-url", "http://127.0.0.1:9/v1", "--max-prompts", "1", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "127.0.0.1:9" in out.stderr and "Traceback" not in out.stderr


def test_readme_commands_are_what_ci_runs():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    blocks = readme.split("```")
    first_block = blocks[1]
    test_line = next(line for line in first_block.splitlines() if "pytest" in line)
    assert test_line.strip() in (root / ".ci" / "run").read_text()
    assert "selfalign run" in first_block
