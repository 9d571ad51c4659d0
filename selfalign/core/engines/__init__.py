"""Engines: `hf` (default), `openai` (any OpenAI-compatible server), `vllm` (GPU or vLLM's CPU build,
optional extra)."""

from __future__ import annotations

from typing import Any

from selfalign.core.engines.base import Completion, Engine, Sampling
from selfalign.core.errors import SelfAlignError

ENGINES = ("hf", "openai", "vllm")


def make_engine(name: str, model: str, **options: Any) -> Engine:
    """Build an engine by name; heavy imports (vllm, torch) happen only for the one chosen."""
    if name == "hf":
        from selfalign.core.engines.hf import HFEngine

        return HFEngine(model, **options)
    if name == "openai":
        from selfalign.core.engines.openai import OpenAIEngine

        return OpenAIEngine(model, **options)
    if name == "vllm":
        from selfalign.core.engines.vllm import VLLMEngine

        return VLLMEngine(model, **options)
    raise SelfAlignError(f"unknown engine {name!r}", f"choose one of: {', '.join(ENGINES)}")


__all__ = ["Completion", "Engine", "Sampling", "make_engine", "ENGINES"]
