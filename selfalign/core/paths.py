"""Where selfalign keeps what it makes once and reuses: converted models, evaluation data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$SELFALIGN_CACHE`, else `$XDG_CACHE_HOME/selfalign`, else `~/.cache/selfalign`."""
    if env := os.environ.get("SELFALIGN_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selfalign"


def models_cache_dir() -> Path:
    return cache_dir() / "models"
