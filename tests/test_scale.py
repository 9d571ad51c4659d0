"""Scaling out, the fast part (no Ray cluster, no second process): recipe validation of `engine`
parallelism, `workers` and `launcher`, the row store's shards, and the exact `accelerate launch`
command lines a recipe builds. The runs themselves are in tests/test_distributed.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from selfalign.core.errors import SelfAlignError
from selfalign.stages import parse_recipe


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "selfalign.cli", *args], capture_output=True, text=True,
                          env={**os.environ}, cwd=cwd)


def write_recipe(tmp_path, **top):
    data = {"name": "scale", "model": "tiny:llama",
            "stages": [{"stage": "generate", "prompts": "builtin:quickstart", "sampling": {"max_new_tokens": 4}}], **top}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- vLLM parallelism ---------------------------------------------------------------------------------
def test_tensor_parallel_on_hf_is_one_line_exit_2(tmp_path):
    path = write_recipe(tmp_path, engine={"name": "hf", "tensor_parallel_size": 2})
    out = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert "engine" in lines[0] and "tensor_parallel_size is a vllm setting" in lines[0]
    assert not (tmp_path / "run").exists()


def test_parallelism_is_accepted_on_vllm_and_not_fingerprinted():
    from selfalign.core.fingerprint import stage_settings

    base = {"name": "x", "stages": [{"stage": "generate", "prompts": "builtin:quickstart"}]}
    plain = parse_recipe({**base, "engine": {"name": "vllm"}})
    wide = parse_recipe({**base, "engine": {"name": "vllm", "tensor_parallel_size": 8, "data_parallel_size": 2}})
    assert wide.engine.options()["tensor_parallel_size"] == 8 and "pipeline_parallel_size" not in wide.engine.options()
    assert stage_settings(plain, plain.stages[0], {}) == stage_settings(wide, wide.stages[0], {})
    for bad in ({"name": "openai", "data_parallel_size": 2}, {"name": "vllm", "tensor_parallel_size": 0}):
        with pytest.raises(SelfAlignError):
            parse_recipe({**base, "engine": bad})
