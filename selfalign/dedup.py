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

import numpy as np

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


def _overlap_table(threshold: float, inclusive: bool, max_total: int) -> list[int]:
    """need[T]: the overlap (LCS, hence also shared tokens) two texts of total length T need at least
    to pass the threshold. It is never above the true minimum (an epsilon absorbs float rounding, and
    the exact score decides at the end), so no filter built on it can drop a true duplicate."""
    eps = 1e-9
    if inclusive:
        return [max(1, math.ceil(threshold * t / 2.0 - eps)) for t in range(max_total + 1)]
    return [math.floor(threshold * t / 2.0 - eps) + 1 for t in range(max_total + 1)]


def _prefix_length(n: int, need: list[int]) -> int:
    """n - o + 1, o the smallest overlap a text of length n can share with any possible duplicate.
    A partner of length m needs need[n+m] <= m; m - need[n+m] never decreases as m grows, so the
    shortest possible partner is found by bisection, and (need growing with m) it has the smallest o.
    m = n always qualifies (need[2n] <= n for thresholds <= 1)."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if need[n + mid] <= mid:
            hi = mid
        else:
            lo = mid + 1
    return n - need[n + lo] + 1


def rouge_dedup(candidates: Sequence[str], threshold: float = 0.7, existing: Sequence[str] = (),
                inclusive: bool = False) -> DedupResult:
    """Keep each candidate, in order, unless its ROUGE-L to an existing or already-kept text is
    above `threshold` (or equal, with `inclusive`). Same result as `naive_dedup` (same keep list, and
    for a dropped one the same closest kept text and score), with far fewer LCS computations."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    texts = [rouge_tokens(t) for t in (*existing, *candidates)]
    n_existing = len(existing)
    lens = [len(t) for t in texts]
    max_len = max(lens, default=0)
    # token occurrences as set elements ("the" twice is ("the", 0) and ("the", 1)), ranked rarest
    # first; a text becomes the ascending list of its elements' ranks
    raw = [[(tok, k) for tok, c in Counter(toks).items() for k in range(c)] for toks in texts]
    freq = Counter(e for els in raw for e in els)
    rank = {e: r for r, (e, _) in enumerate(sorted(freq.items(), key=lambda kv: (kv[1], kv[0])))}
    elements = [sorted(rank[e] for e in els) for els in raw]
    del raw, rank
    need = _overlap_table(threshold, inclusive, 2 * max_len)
    plen = {n: _prefix_length(n, need) for n in set(lens) if n}
    prefixes = [els[: plen[len(els)]] if els else [] for els in elements]

    # The index: for each element e, the kept texts holding e in their prefix, coded (text << qbits) |
    # position, in e's slice of one flat array (room reserved for every text that could be kept).
    qbits = max(max_len, 1).bit_length()
    cap = [0] * len(freq)
    for pre in prefixes:
        for e in pre:
            cap[e] += 1
    start = [0] * len(freq)
    acc = 0
    for e, c in enumerate(cap):
        start[e] = acc
        acc += c
    fill = [0] * len(freq)
    postings = np.zeros(acc, dtype=np.int64)
    # all elements of all texts, flat (CSR), for the exact shared-token count of candidates
    all_elements = np.fromiter((e for els in elements for e in els), dtype=np.int64, count=sum(lens))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    lens_np = np.asarray(lens, dtype=np.int64)
    need_np = np.asarray(need, dtype=np.int64)
    positions = np.arange(max_len + 1, dtype=np.int64)
    in_probe = np.zeros(len(freq) + 1, dtype=bool)

    keep, match, score, comps = [], [], [], 0
    for i, toks in enumerate(texts):
        n = lens[i]
        pre = prefixes[i]
        best, best_i = 0.0, None
        if i >= n_existing and n:
            sizes = [fill[e] for e in pre]
            if any(sizes):
                segs = [postings[start[e]: start[e] + s] for e, s in zip(pre, sizes, strict=True) if s]
                codes = np.concatenate(segs) if len(segs) > 1 else segs[0]
                p = np.repeat(positions[: len(pre)], sizes)
                j = codes >> qbits
                q = codes & ((1 << qbits) - 1)
                m = lens_np[j]
                o = need_np[m + n]
                # prefix filter, per partner length: with o elements in common, the rarest shared one
                # sits within the first n - o + 1 of this text and the first m - o + 1 of the other
                # (this also rules out lengths no duplicate can have, o > min(n, m))
                cand = np.unique(j[(p <= n - o) & (q <= m - o)])
                if cand.size:
                    # exact multiset overlap (it bounds the LCS) of every candidate, vectorized
                    cl = lens_np[cand]
                    ends = np.cumsum(cl)
                    begins = ends - cl
                    gather = np.repeat(offsets[cand] - begins, cl) + np.arange(ends[-1], dtype=np.int64)
                    mine = all_elements[offsets[i]: offsets[i] + n]
                    in_probe[mine] = True
                    shared = np.zeros(ends[-1] + 1, dtype=np.int64)
                    np.cumsum(in_probe[all_elements[gather]], out=shared[1:])
                    in_probe[mine] = False
                    for jj in cand[shared[ends] - shared[begins] >= need_np[cl + n]].tolist():
                        comps += 1
                        s = rouge_l(toks, texts[jj])
                        if s > best:  # ascending text order: ties go to the earliest, as in naive_dedup
                            best, best_i = s, jj
        dup = best_i is not None and is_duplicate(best, threshold, inclusive)
        if i >= n_existing:
            keep.append(not dup)
            match.append(best_i if dup else None)
            score.append(best if dup else 0.0)
        if not dup:
            code = i << qbits
            for pos, e in enumerate(pre):
                postings[start[e] + fill[e]] = code | pos
                fill[e] += 1
    return DedupResult(keep, match, score, comps)
