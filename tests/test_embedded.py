"""The embedded default model, for real: slow (a one-time ~1.5 minute conversion, then CPU inference)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from selfalign.core.engines.hf import HFEngine

    return HFEngine("embedded:gemma-3-270m", batch_size=4)


def test_embedded_model_is_gemma_and_cached(gemma):
    from selfalign.core.models import MARKER, resolve

    r = resolve("embedded:gemma-3-270m")
    assert (os.path.join(r.path, MARKER)) and os.path.exists(os.path.join(r.path, "model.safetensors"))
    assert gemma.model.config.model_type == "gemma3_text" and gemma.model.config.vocab_size == 262144


def test_embedded_model_knows_a_fact(gemma):
    paris, banana = gemma.score("The capital of France is", [" Paris", " banana"])
    assert paris > banana + 3
    text = gemma.generate(
        ["The capital of France is"],
        __import__("selfalign.core.engines", fromlist=["Sampling"]).Sampling(temperature=0, max_new_tokens=4),
    )[0][0].text
    assert "Paris" in text or "capital" in text


def test_quickstart_runs_on_the_embedded_model(tmp_path):
    """The README's main job, with prompts capped at 8 (enough that self_align keeps some answers)."""
    out = tmp_path / "quick"
    res = subprocess.run(
        [sys.executable, "-m", "selfalign.cli", "run", "--max-prompts", "8", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    record = json.loads((out / "run.json").read_text())
    assert list(record["stages"]) == ["eval_base", "self_instruct", "self_align", "engrave", "eval_aligned"]
    after = json.loads(next(out.glob("*-eval_aligned/results.json")).read_text())
    assert {"behaviour", "hhh", "truthfulqa", "capability"} <= set(after["evals"])
