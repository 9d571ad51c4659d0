"""Small shims over transformers versions, so one code path runs on every version pyproject allows."""

from __future__ import annotations

from functools import cache


@cache
def kv_cache_name() -> str:
    """The keyword (and output field) naming a KV cache: `cache` in recent transformers, where the old
    `past_key_values` still works but prints a FutureWarning on every call; `past_key_values` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def text_config(model):
    """The config of a model's language part: `get_text_config()` where transformers has it (a
    multimodal config nests one), else the config itself."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
