"""Shared fixtures: every test runs offline on tiny models built in-process, in a private cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """A model cache of the test session's own, so tests never touch (or depend on) the user's."""
    if "SELFALIGN_TEST_REAL_CACHE" in os.environ:  # slow tests may reuse the converted embedded model
        yield None
        return
    cache = tmp_path_factory.mktemp("selfalign-cache")
    old = os.environ.get("SELFALIGN_CACHE")
    os.environ["SELFALIGN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SELFALIGN_CACHE", None)
    else:
        os.environ["SELFALIGN_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_engine(private_cache):
    from selfalign.core.engines.hf import HFEngine

    return HFEngine("tiny:llama", batch_size=4, dtype="float32")  # float32 on a GPU too: tests compare to 1e-3


@pytest.fixture(scope="session")
def tiny_gemma_engine(private_cache):
    from selfalign.core.engines.hf import HFEngine

    return HFEngine("tiny:gemma3", batch_size=4, dtype="float32")


@pytest.fixture(scope="session")
def tiny_gemma_bf16_engine(private_cache):
    """The opt-in bfloat16 engine (fast where a CPU has AMX): its own decode and scoring paths, compared
    with the plain paths in the same dtype."""
    from selfalign.core.engines.hf import HFEngine

    return HFEngine("tiny:gemma3", batch_size=4, dtype="bfloat16")
