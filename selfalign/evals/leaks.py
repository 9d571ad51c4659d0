"""Does training text leak evaluation items? Two tests of closeness between a text this project
wrote (an asset) and an evaluation item (a BIG-bench HHH query or reply, a TruthfulQA question or
answer): a shared run of `n` words (8 by default; long enough that common phrases such as "what is
the difference between" do not trigger it), or a ROUGE-L F-measure above `rouge` (0.5 by default:
the same question reworded). Used by tests/test_asset_leaks.py on the shipped assets, and usable on
a user's own prompt files before training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from selfalign.core.dedup import rouge_dedup

MIN_ROUGE_WORDS = 4


@dataclass(frozen=True)
class Leak:
    source: str  # where the asset text is (file and position)
    text: str
    item: str  # the evaluation item's id
    item_text: str
    why: str  # "shared N-word run: ..." or "ROUGE-L 0.62"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def text_segments(path: Path) -> list[tuple[str, str]]:
    """(where, text) of every string a file holds: each string leaf of a YAML file (each prompt,
    turn, principle...), each non-comment line of a text file."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        out: list[tuple[str, str]] = []

        def walk(node, where: str) -> None:
            if isinstance(node, str):
                out.append((where, node))
            elif isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{where}.{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}[{i}]")

        walk(yaml.safe_load(raw), path.name)
        return out
    return [(f"{path.name}:{i}", line.strip()) for i, line in enumerate(raw.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")]


def find_leaks(texts: Iterable[tuple[str, str]], items: Iterable[tuple[str, str]], n: int = 8,
               rouge: float = 0.5) -> list[Leak]:
    """Every (asset text, evaluation item) pair that shares an `n`-word run or has ROUGE-L above
    `rouge`. Texts under MIN_ROUGE_WORDS words (ids, short labels) are not compared by ROUGE-L: two
    three-word labels that share two words score 0.67 without saying anything about a leak."""
    texts, items = list(texts), list(items)
    leaks = []
    index: dict[tuple[str, ...], list[int]] = {}
    for j, (_, t) in enumerate(items):
        for g in ngrams(t, n):
            index.setdefault(g, []).append(j)
    for where, t in texts:
        hits = {j: g for g in ngrams(t, n) for j in index.get(g, ())}
        leaks += [Leak(where, t, items[j][0], items[j][1], f"shared {n}-word run: {' '.join(g)!r}")
                  for j, g in hits.items()]
    # ROUGE-L: one pass of rouge_dedup with the items as the existing texts; a text it drops for
    # resembling another *text* (not an item) is checked again on its own
    long = [(w, t) for w, t in texts if len(words(t)) >= MIN_ROUGE_WORDS]
    item_texts = [t for _, t in items]
    res = rouge_dedup([t for _, t in long], rouge, existing=item_texts)
    for (where, t), keep, j, score in zip(long, res.keep, res.match, res.score, strict=True):
        if not keep and j >= len(items):
            again = rouge_dedup([t], rouge, existing=item_texts)
            keep, j, score = again.keep[0], again.match[0], again.score[0]
        if not keep:
            leaks.append(Leak(where, t, items[j][0], items[j][1], f"ROUGE-L {score:.2f}"))
    return leaks


def eval_items(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(id, text) of every BIG-bench HHH query and reply and every TruthfulQA question and answer."""
    from selfalign.evals.data import load_hhh, load_truthfulqa

    out = []
    for it in load_hhh(data_dir, verify=False):
        out += [(f"hhh:{it.id}:input", it.input), (f"hhh:{it.id}:good", it.good), (f"hhh:{it.id}:bad", it.bad)]
    for it in load_truthfulqa(data_dir, verify=False):
        out.append((f"{it.id}:question", it.question))
        out += [(f"{it.id}:answer{k}", a) for k, a in enumerate((*it.correct_answers, *it.incorrect_answers))]
    return out
