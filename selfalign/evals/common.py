"""What every evaluation shares: system prompts, resumable per-item rows, the result shape.

An evaluation writes one row per scored item into `rows.jsonl` of its folder (so a killed eval
resumes where it stopped, like a generation stage) and returns a result dict:

    {"eval": "hhh", "metrics": {group: {key: value}}, "counts": {key: n}, "wall_s": s, ...}

which `results.json` collects and the report turns into tables and charts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from selfalign.core.assets_io import ASSETS
from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import read_text
from selfalign.core.progress import progress_bar
from selfalign.core.store import RowStore


def builtin_systems() -> list[str]:
    return ["hhh"] + sorted(p.stem for p in (ASSETS / "system").glob("*.txt"))


def resolve_system(system: str | None) -> str | None:
    """`None`, `hhh` (the full HHH prompt: preamble and 14 dialogues, ~5k tokens),
    `builtin:NAME` (selfalign/assets/system/NAME.txt, e.g. hhh_short), one entry of a YAML asset
    (`builtin:self_align/system_prompts.yaml#engraved`), a path to a text file, or the text itself."""
    if not system:
        return None
    # builtin:self_align/system_prompts.yaml#engraved
    if "#" in system and system.split("#", 1)[0].endswith((".yaml", ".yml")):
        from selfalign.core.assets_io import yaml_key

        ref, key = system.split("#", 1)
        return yaml_key(ref, key)
    name = system.split(":", 1)[1] if system.startswith("builtin:") else system
    if name == "hhh":
        from selfalign.core.hhh_prompt import render_hhh_prompt

        return render_hhh_prompt()
    if (ASSETS / "system" / f"{name}.txt").exists():
        return (ASSETS / "system" / f"{name}.txt").read_text(encoding="utf-8").strip()
    if system.startswith("builtin:"):
        raise SelfAlignError(f"no built-in system prompt {name!r}", f"available: {', '.join(builtin_systems())}")
    if len(system) < 512 and "\n" not in system:  # could be a path
        path = Path(system).expanduser()
        if path.is_file():
            return read_text(path, "system prompt file").strip()
        if path.suffix in (".txt", ".md"):
            raise SelfAlignError(f"system prompt file {path} does not exist")
    return system


def score_rows_resumably(
    store: RowStore,
    work: Sequence[tuple[str, object]],
    score_chunk: Callable[[list[object]], list[dict]],
    label: str,
    chunk_size: int = 16,
) -> list[dict]:
    """Score `work` = [(row id, item)] in chunks, appending each chunk's rows as it finishes and
    skipping ids already in the store. Returns the rows of all of `work`, in order.

    A chunk is what a kill can lose, and the most the engine sees at once: the hf engine packs and
    sorts items within one call, so chunks too small cost speed (full-set HHH in chunks of 16 took
    ~10% longer than in one call on gemma-3-270m). The likelihood evals use chunks of about a
    minute's work on a 2-core CPU."""
    done = store.done_ids()
    todo = [(rid, item) for rid, item in work if rid not in done]
    if todo:
        with progress_bar(label, total=len(todo), already_done=len(work) - len(todo)) as advance:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start:start + chunk_size]
                rows = score_chunk([item for _, item in chunk])
                for (rid, _), row in zip(chunk, rows, strict=True):
                    row["id"] = rid
                store.append(rows)
                advance(len(chunk))
    by_id = {r["id"]: r for r in store.rows()}
    return [by_id[rid] for rid, _ in work]
