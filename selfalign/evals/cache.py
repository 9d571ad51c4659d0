"""Evaluations of an unchanged model, computed once and reused by every run.

Every run of a recipe evaluates the same base model on the same items with the same settings, and
gets the same numbers: minutes on a CPU for nothing. So an eval of a model that sits in selfalign's
model cache (the embedded, tiny and converted GGUF models: the ones no run changes) keeps its
per-item rows under `cache_dir()/evals/<model fingerprint>/<eval>-<settings key>/` instead of the
stage folder; the next run finds them done and scores nothing (a "cache hit"). The stage folder
still gets a copy of the rows, so a run folder stays complete on its own.

The fingerprint is of the model's files (names, sizes, and a hash of each file's first and last
MiB), not its name: a re-converted or edited model gets new entries. The settings key covers what
changes the numbers: the eval, its settings (scorings, system prompt, limit, data, token cap) and the
engine with its options.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from selfalign.core.paths import cache_dir, models_cache_dir

EDGE = 1 << 20  # bytes hashed at each end of a file


def model_fingerprint(folder: Path) -> str:
    """A short hash of a model folder's files: names, sizes, first and last MiB of each."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(EDGE))
            if size > 2 * EDGE:
                fh.seek(size - EDGE)
                digest.update(fh.read(EDGE))
    return digest.hexdigest()[:16]


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_model_folder(model_ref: str) -> Path | None:
    """The folder of a model that lives in selfalign's model cache (so no run changes it), else None."""
    from selfalign.core.models import resolve

    try:
        resolved = resolve(model_ref)
    except Exception:  # not resolvable here (a hub id offline, ...): just do not cache
        return None
    if resolved.kind == "peft" or not resolved.is_local:
        return None
    path = Path(resolved.path).resolve()
    root = models_cache_dir().resolve()
    return path if path.is_relative_to(root) and path.is_dir() else None


def eval_cache_folder(model_ref: str, eval_name: str, settings: dict) -> Path | None:
    """Where this eval of this model keeps its rows across runs, or None if the model is not cacheable."""
    folder = cached_model_folder(model_ref)
    if folder is None:
        return None
    return (
        cache_dir() / "evals" / f"{folder.name}-{model_fingerprint(folder)}" / f"{eval_name}-{settings_key(settings)}"
    )


def copy_rows(src_folder: Path, dest_folder: Path, eval_name: str) -> None:
    """Copy an eval's row folder (rows and done-marker) from the cache into the stage folder."""
    src, dest = Path(src_folder) / eval_name, Path(dest_folder) / eval_name
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
