"""A stage's fingerprint: what its outputs depend on, so a finished stage is reused only for the
same question.

A stage's settings are flattened into one mapping of named fields: the model it runs (as the
recipe names it), the recipe's seed, cap, engine kind and dtype, every leaf of its resolved config
(`config.sampling.temperature`, ...; a field that came to count in a later selfalign, the engine's
dtype among them, is left out while it holds the value that reproduces the older rows,
`Strict.added_later`), a hash of the contents of
every file a field names, and the fingerprint of every earlier stage it reads through an `@label`
reference. The fingerprint is the hash of that mapping. The done-marker keeps both, so a mismatch
can name the fields that changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from selfalign.core.recipe import Recipe, StageConfig

PLACEMENT = ("workers", "ray_address")  # where a stage's rows are made, not what they are


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def file_digest(ref: str) -> str | None:
    """sha256 (16 hex digits) of a user's file a field names, or None when it names no file.
    Shipped assets (`builtin:`) are part of the installed package, not of the run's inputs."""
    if not ref or ref.startswith(("builtin:", "@")) or "\n" in ref or len(ref) > 4096:
        return None
    try:
        path = Path(ref).expanduser()
        if not path.is_file():
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def stage_settings(recipe: Recipe, config: StageConfig, earlier: dict[str, str]) -> dict[str, Any]:
    """The named fields a stage's outputs depend on; `earlier` maps the labels of the stages before
    it to their fingerprints."""
    at_old = set(type(config).added_later) - set(config.departures_from_old())
    dump = config.model_dump(mode="json", exclude=set(PLACEMENT) | at_old)
    model = config.model or recipe.model
    settings: dict[str, Any] = {
        "model": model,
        "seed": recipe.seed,
        "max_prompts": recipe.max_prompts,
        "engine": recipe.engine.name,
        "engine.chat_format": recipe.engine.chat_format,
        **{f"engine.{key}": value for key, value in recipe.engine.departures_from_old().items()},
        **_leaves(dump, "config"),
    }
    from selfalign.core.launcher import launched

    if launched(recipe, config):  # batch_size is per process: N processes train on N times the batch
        settings["launcher.num_processes"] = recipe.launcher.num_processes
    for key, value in _leaves(dump, "config").items():
        for text in _strings(value):
            if (digest := file_digest(text)) is not None:
                settings[f"{key} (contents of {text})"] = digest
    for text in [model, *_strings(dump)]:
        if text.startswith("@") and text[1:] in earlier:
            settings[f"output of {text}"] = earlier[text[1:]]
    return settings


def fingerprint(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def changed_fields(old: dict[str, Any], new: dict[str, Any], most: int = 4) -> str:
    """The fields that differ, as `field (old -> new)`, at most `most` of them and a count of the rest."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    parts = [f"{k} ({_short(old.get(k, '<unset>'))} -> {_short(new.get(k, '<unset>'))})" for k in keys[:most]]
    if len(keys) > most:
        parts.append(f"and {len(keys) - most} more")
    return ", ".join(parts) or "the stage's inputs"
