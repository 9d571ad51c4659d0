"""ROUGE-L near-duplicate filtering that scales: the dedup rule of Self-Instruct and ALMoST.

The rule (Self-Align: drop a new prompt whose ROUGE-L F1 to any kept prompt is > 0.7; ALMoST:
>= 0.5 against the pool) taken literally compares every new prompt with every kept one: at the
paper's ~360k prompts that is ~10^11 LCS computations, days of CPU. This module keeps *exactly*
the prompts the literal rule keeps, but compares a new prompt only with the few kept prompts that
could possibly be that close:

1. ROUGE-L F1 = 2·LCS/(|a|+|b|) over word tokens, and LCS <= min(|a|,|b|) and LCS <= the size of
   the multiset intersection of the two token bags. So F1 > t needs |b| within a length band of
   |a| and a bag overlap above t·|a|/(2−t).
2. Prefix filtering (PPJoin, from set-similarity joins): with every token occurrence ("the" twice
   is two elements) ordered rarest first, two bags sharing at least o elements share one within
   their first |x|−o+1 elements. Only those prefixes are indexed and probed, so common words
   rarely cause lookups; a positional bound (elements shared so far + what could still follow)
   drops most of the texts a probe meets.
3. Survivors get the exact LCS, computed bit-parallel on Python integers (Allison–Dix / Hyyrö),
   then the threshold.

Tokenization follows the `rouge_score` package without stemming (what Self-Instruct used):
lower-case, every run of characters other than a–z and 0–9 is a separator.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over `a` (Hyyrö 2004)."""
    if not a or not b:
        return 0
    masks: dict[str, int] = defaultdict(int)
    for i, tok in enumerate(a):
        masks[tok] |= 1 << i
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists (symmetric)."""
    if not a or not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def is_duplicate(score: float, threshold: float, inclusive: bool) -> bool:
    return score >= threshold if inclusive else score > threshold


@dataclass
class DedupResult:
    keep: list[bool]  # per candidate
    match: list[int | None]  # index (in existing + candidates) of the closest kept text found, for dropped ones
    score: list[float]  # ROUGE-L to that match (0.0 for kept ones: not computed exactly)
    comparisons: int  # exact LCS computations done


def naive_dedup(candidates: Sequence[str], threshold: float = 0.7, existing: Sequence[str] = (),
                inclusive: bool = False) -> DedupResult:
    """The literal rule: every candidate against every kept text. Quadratic; the reference."""
    kept = [rouge_tokens(t) for t in existing]
    kept_idx = list(range(len(existing)))
    keep, match, score, comps = [], [], [], 0
    for j, text in enumerate(candidates):
        toks = rouge_tokens(text)
        best, best_i = 0.0, None
        for i, other in zip(kept_idx, kept, strict=True):
            comps += 1
            s = rouge_l(toks, other)
            if s > best:
                best, best_i = s, i
        dup = best_i is not None and is_duplicate(best, threshold, inclusive)
        keep.append(not dup)
        match.append(best_i if dup else None)
        score.append(best if dup else 0.0)
        if not dup:
            kept.append(toks)
            kept_idx.append(len(existing) + j)
    return DedupResult(keep, match, score, comps)


def rouge_dedup(candidates: Sequence[str], threshold: float = 0.7, existing: Sequence[str] = (),
                inclusive: bool = False) -> DedupResult:
    """Keep each candidate, in order, unless its ROUGE-L to an existing or already-kept text is
    above `threshold` (or equal, with `inclusive`). Same result as `naive_dedup`, far fewer LCS."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    texts = [rouge_tokens(t) for t in (*existing, *candidates)]
    # token occurrences as set elements ("the" twice is ("the", 0) and ("the", 1)), ranked rarest
    # first, as integers
    raw = [[(tok, k) for tok, n in Counter(toks).items() for k in range(n)] for toks in texts]
    freq = Counter(e for els in raw for e in els)
    rank = {e: r for r, (e, _) in enumerate(sorted(freq.items(), key=lambda kv: (kv[1], kv[0])))}
    elements = [sorted(rank[e] for e in els) for els in raw]
    bags = [frozenset(els) for els in elements]  # the bag of tokens as a set of occurrences
    beta = threshold / (2.0 - threshold)
    eps = 1e-9

    def needed(total: int) -> int:
        """Smallest bag overlap o with 2·o/total above (or at) the threshold."""
        x = threshold * total / 2.0
        return max(1, math.ceil(x - eps)) if inclusive else math.floor(x - eps) + 1

    def prefix_len(n: int) -> int:  # the overlap needed is at least needed(n + beta·n) for any partner
        return max(0, n - needed(math.ceil(n + beta * n - eps)) + 1)

    index: dict[int, list[tuple[int, int]]] = defaultdict(list)  # element -> (text, position)
    keep, match, score, comps = [], [], [], 0
    for i, toks in enumerate(texts):
        n = len(toks)
        best, best_i = 0.0, None
        if i >= len(existing) and n:
            lo, hi = beta * n - eps, n / beta + eps  # the lengths a possible duplicate can have
            hits: dict[int, int] = {}
            for p, e in enumerate(elements[i][: prefix_len(n)]):
                for j, q in index.get(e, ()):
                    h = hits.get(j, 0)
                    if h < 0:
                        continue
                    m = len(texts[j])
                    # positional filter: shared elements so far + all that could still follow
                    if not lo <= m <= hi or h + 1 + min(n - p - 1, m - q - 1) < needed(n + m):
                        hits[j] = -1
                        continue
                    hits[j] = h + 1
            for j, h in hits.items():
                # the bag overlap bounds the LCS: a cheap set intersection before the exact LCS
                if h > 0 and len(bags[i] & bags[j]) >= needed(n + len(texts[j])):
                    comps += 1
                    s = rouge_l(toks, texts[j])
                    if s > best:
                        best, best_i = s, j
        dup = best_i is not None and is_duplicate(best, threshold, inclusive)
        if i >= len(existing):
            keep.append(not dup)
            match.append(best_i if dup else None)
            score.append(best if dup else 0.0)
        if not dup and n:
            for q, e in enumerate(elements[i][: prefix_len(n)]):
                index[e].append((i, q))
    return DedupResult(keep, match, score, comps)
