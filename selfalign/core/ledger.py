"""The supervision ledger: how much human-written input a run used, counted honestly.

The papers' claim is about how little human supervision the methods need (Self-Align: "fewer than
300 lines"). Lines depend on formatting (a 146-word answer can be one line, a 30-word principle
three), so the headline unit here is words, with lines beside them. What counts:

- every human-written text a stage reads, each counted once: the asset files (principles,
  exemplars, seeds, the HHH prompt, system prompts, and the prompt templates and filter rules that
  live in `templates.yaml` files rather than in code), prompt files, and text written into the
  recipe (a system prompt, a user prompt);
- outside data given to a stage (a PMP corpus, a reward-model, SFT or comparison file), listed with
  its row count and path: human-made, but data rather than instructions, so not in the word total.

A word is a run of letters, digits and apostrophes (`WORD`), so YAML keys, list markers and
punctuation never count; in YAML files only the string values count, less the bookkeeping fields
the model never reads (`META_KEYS`: ids, tags, themes, roles). An input that cannot be read is an
error naming the stage, not a silent skip. Not counted: the recipe's settings (model, budgets,
sampling, rubrics), which a person also chose; `NOT_COUNTED` says so in the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from selfalign.core.errors import SelfAlignError

WORD = re.compile(r"[A-Za-z0-9']+")
META_KEYS = frozenset({"id", "tag", "kind", "theme", "role"})
HHH_SOURCE = "builtin:hhh/prompt.yaml"
HHH_NAMES = frozenset({"hhh", "builtin:hhh", "system:hhh", "system:builtin:hhh"})
DATA_FIELDS = ("data", "corpus", "text_file")
NOT_COUNTED = ("the recipe's settings (models, budgets, sampling, rubrics, thresholds), the code's "
               "structure, and evaluation data (read only to measure)")


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def count_lines(text: str) -> int:
    return sum(1 for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#"))


def string_leaves(node, key: str | None = None) -> list[str]:
    """The strings of a parsed YAML value that a model reads: every string, less META_KEYS values."""
    if isinstance(node, str):
        return [] if key in META_KEYS else [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in string_leaves(v, str(k))]
    if isinstance(node, list):
        return [s for v in node for s in string_leaves(v, key)]
    return []


def _is_yaml(source: str) -> bool:
    return source.split("#", 1)[0].lower().endswith((".yaml", ".yml"))


def text_words(source: str, text: str) -> int:
    """Words of one input: of its string values for a whole YAML file, of the text otherwise."""
    if _is_yaml(source) and "#" not in source:
        try:
            return sum(count_words(s) for s in string_leaves(yaml.safe_load(text)))
        except yaml.YAMLError:
            pass
    return count_words(text)


def canonical(source: str, text: str) -> tuple[str, str]:
    """One name per input: every spelling of the HHH prompt is its asset file."""
    if source in HHH_NAMES:
        from selfalign.core.assets_io import asset_text

        return HHH_SOURCE, asset_text(HHH_SOURCE)
    return source, text


def gather(pairs: list[tuple[str, str]]) -> list[dict]:
    """Entries for (source, text) pairs, each text once: a YAML key (`file#key`) or a text that is a
    value inside a whole file already counted is part of that file, and identical texts count once."""
    pairs = [canonical(s, t) for s, t in pairs]
    whole = {s: t for s, t in pairs if _is_yaml(s) and "#" not in s}
    inside: set[str] = set()
    for t in whole.values():
        try:
            inside |= {" ".join(x.split()) for x in string_leaves(yaml.safe_load(t))}
        except yaml.YAMLError:
            continue
    seen: dict[str, dict] = {}
    for source, text in pairs:
        norm = " ".join(text.split())
        part_of_file = "#" in source and source.split("#", 1)[0] in whole
        if part_of_file or (source not in whole and norm in inside) or norm in seen or not norm:
            continue
        seen[norm] = {"source": source, "kind": "text", "words": text_words(source, text), "lines": count_lines(text)}
    return list(seen.values())


def count_rows(path: Path) -> int:
    """Rows in a data file (JSONL and text: non-empty lines; JSON: list items or `examples`;
    Parquet: its metadata) or in every such file of a folder."""
    if path.is_dir():
        return sum(count_rows(p) for p in sorted(path.rglob("*"))
                   if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".parquet", ".txt"))
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data.get("examples", data) if isinstance(data, dict) else data
            return len(data) if isinstance(data, list) else 1
        with path.open(encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SelfAlignError(f"{path}: cannot be read to count its rows ({exc})", "fix or replace the file") from None


def outside_data(recipe) -> list[dict]:
    """Data files given to stages (not an earlier stage's rows): path, stage, field and row count."""
    labels = {c.label for c in recipe.stages}
    out = []
    for config in recipe.stages:
        for field in DATA_FIELDS:
            value = getattr(config, field, None)
            if not isinstance(value, str) or not value.strip() or value.startswith("@") or value in labels:
                continue
            path = Path(value).expanduser()
            if not path.exists():
                raise SelfAlignError(f"{config.label}.{field}: {value}: no such file or stage",
                                     "name an earlier stage or an existing data file")
            out.append({"source": str(path), "kind": "data", "stage": config.label, "field": field,
                        "rows": count_rows(path)})
    return out


def build_ledger(recipe) -> dict:
    """The run's ledger: `inputs` (texts, then outside data), the `words` and `lines` totals of the
    texts, and what is `not_counted`. Raises SelfAlignError, naming the stage, when an input cannot
    be read."""
    pairs: list[tuple[str, str]] = []
    for config in recipe.stages:
        try:
            pairs += config.human_inputs()
        except SelfAlignError as exc:
            raise SelfAlignError(f"{config.label}: a human-written input cannot be read: {exc}") from None
        except OSError as exc:
            raise SelfAlignError(f"{config.label}: a human-written input cannot be read: {exc}") from None
    texts = gather(pairs)
    return {"inputs": texts + outside_data(recipe), "words": sum(e["words"] for e in texts),
            "lines": sum(e["lines"] for e in texts), "not_counted": NOT_COUNTED}


def asset_size(ref: str) -> dict:
    """Words and lines of one asset file, counted as the ledger counts them (for the READMEs)."""
    from selfalign.core.assets_io import asset_text

    text = asset_text(ref)
    return {"words": text_words(ref, text), "lines": count_lines(text)}
