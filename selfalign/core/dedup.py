"""ROUGE-L near-duplicate filtering that scales: the dedup rule of Self-Instruct and ALMoST.

The rule (Self-Align: drop a new prompt whose ROUGE-L F1 to any kept prompt is > 0.7; ALMoST:
>= 0.5 against the pool) taken literally compares every new prompt with every kept one: at the
paper's ~360k prompts that is ~10^11 LCS computations, days of CPU. `rouge_dedup` keeps *exactly*
the prompts the literal rule (`naive_dedup`) keeps, and names the same closest kept prompt for a
dropped one, but computes the LCS only for the few kept prompts that could be that close:

1. ROUGE-L F1 = 2·LCS/(|a|+|b|) over word tokens. The LCS is at most the size of the multiset
   intersection of the two token bags (a common subsequence uses each shared token occurrence
   once), so F1 > t needs a bag overlap of at least o(|a|+|b|), the smallest integer above (or,
   for >=, at) t·(|a|+|b|)/2 -- and o <= min(|a|,|b|), which bounds the length ratio.
2. Prefix filtering (PPJoin; its l-prefix generalisation from AdaptJoin / pkwise): every token
   occurrence is an element ("the" twice is two elements) and a text's elements are ordered
   rarest first. If two bags share >= o elements, their first two shared elements lie within the
   first |x|-o+2 elements of each. So each text is indexed under the *pairs* of elements of that
   prefix (taken for the shortest partner it could have), and a probe looks up its own pairs,
   keeping a hit only when the second element of the pair sits within both per-partner-length
   prefixes. A pair of fairly common words is much rarer than either word, which is what keeps
   the lists short. Texts whose prefix would give too many pairs (very long ones) and the
   one-word-overlap case of tiny texts use single elements (the plain prefix filter) instead.
   Signatures are hashed into buckets; a collision only adds hits that the next step rejects.
3. Hits are checked with the exact bag overlap, vectorised, then the exact LCS (bit-parallel on
   Python integers, Allison–Dix / Hyyrö) decides, in order, against kept texts only.

The order matters (a prompt is compared only with the kept ones before it), so candidates are
screened in blocks: a block is probed at once against the index of everything kept before it,
plus all pairs inside the block; then its texts are decided one by one (a text inside the block
counts only if it was kept) and the kept ones are added to the index. Everything but the final
LCS runs as numpy array operations over the whole block.

Tokenization follows the `rouge_score` package without stemming (what Self-Instruct used):
lower-case, every run of characters other than a–z and 0–9 is a separator.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

_ALNUM = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """The maximal runs of a-z0-9 of the lower-cased text (= replacing every other run by a space, then
    splitting, as rouge_score does)."""
    return _ALNUM.findall(text.lower())


LOOP_NGRAM, LOOP_COUNT = 4, 3


def answer_sentences(answer: str) -> list[str]:
    """The answer split at sentence ends and line breaks, blank pieces dropped."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", answer) if s.strip()]


def repeats_degenerately(answer: str, n: int = LOOP_NGRAM, count: int = LOOP_COUNT) -> bool:
    """The same sentence (of 3+ words) twice, or one word n-gram `count` times: the answer loops.
    One copy serves both the behaviour eval's repetition metric and Self-Align's training filter."""
    said = [" ".join(rouge_tokens(s)) for s in answer_sentences(answer)]
    said = [s for s in said if len(s.split()) >= 3]
    if len(said) != len(set(said)):
        return True
    words = rouge_tokens(answer)
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= count:
            return True
    return False


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


_BLOCK = 1024  # candidates screened together against the frozen index
_PAIR_CAP = 32  # longest prefix indexed by element pairs (496 pairs); longer texts use single elements
_CHUNK = 1 << 22  # most index hits expanded into arrays at once
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _overlap_table(threshold: float, inclusive: bool, max_total: int) -> np.ndarray:
    """need[T]: the LCS (hence also the bag overlap) two texts of total length T need at least to
    pass the threshold. Never above the true minimum -- an epsilon absorbs float rounding and the
    exact score decides at the end -- so no filter built on it can drop a true duplicate."""
    eps = 1e-9
    if inclusive:
        need = [max(1, math.ceil(threshold * t / 2.0 - eps)) for t in range(max_total + 1)]
    else:
        need = [math.floor(threshold * t / 2.0 - eps) + 1 for t in range(max_total + 1)]
    return np.asarray(need, dtype=np.int64)


def _smallest_overlap(n: int, need: np.ndarray) -> int:
    """The smallest overlap a text of length n can need with any possible duplicate. A partner of
    length m needs need[n+m] <= m; m - need[n+m] never decreases as m grows, so the shortest
    possible partner is found by bisection, and (need growing with m) it needs the least.
    m = n always qualifies (need[2n] <= n for thresholds <= 1)."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if need[n + mid] <= mid:
            hi = mid
        else:
            lo = mid + 1
    return int(need[n + lo])


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c)."""
    ends = np.cumsum(counts)
    return np.repeat(starts - ends + counts, counts) + np.arange(ends[-1] if len(ends) else 0)


def _chunks(counts: np.ndarray) -> Iterator[slice]:
    """Consecutive slices of `counts` summing to at most _CHUNK (or one entry, if it alone exceeds it)."""
    cum = np.cumsum(counts)
    lo = 0
    while lo < len(counts):
        base = cum[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, base + _CHUNK, side="right")))
        yield slice(lo, hi)
        lo = hi


def _elements(texts: list[list[str]], lens: np.ndarray) -> tuple[np.ndarray, int]:
    """Every text as the ascending ranks of its elements (token occurrences: the k-th "the" of a
    text is element ("the", k)), rarest element first, concatenated; and the number of elements."""
    vocab: defaultdict[str, int] = defaultdict()
    vocab.default_factory = vocab.__len__  # a new word gets the next id
    total = int(lens.sum())
    tok = np.fromiter(map(vocab.__getitem__, chain.from_iterable(texts)), np.int64, total)
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), lens)
    key = owner * len(vocab) + tok
    order = np.argsort(key, kind="stable")
    sk = key[order]
    first = np.ones(total, dtype=bool)
    first[1:] = sk[1:] != sk[:-1]
    at = np.arange(total)
    occurrence = np.empty(total, dtype=np.int64)
    occurrence[order] = at - np.maximum.accumulate(np.where(first, at, 0))
    # element ids: token t's occurrences k = 0, 1, ... get consecutive ids
    most = np.zeros(len(vocab), dtype=np.int64)
    np.maximum.at(most, tok, occurrence + 1)
    first_id = np.cumsum(most) - most
    element = first_id[tok] + occurrence
    n_elements = int(most.sum())
    count = np.bincount(element, minlength=n_elements)
    rank = np.empty(n_elements, dtype=np.int64)
    rank[np.argsort(count, kind="stable")] = np.arange(n_elements)  # rarest first, ties by id
    ranked = owner * n_elements + rank[element]
    return np.sort(ranked) - owner * n_elements, n_elements


def _signatures(lens: np.ndarray, offsets: np.ndarray, elements: np.ndarray, n_el: int, need: np.ndarray):
    """Per text t, rows start[t]:start[t+1] of (key, position) for the signatures it is indexed under
    once kept, then the same for those it probes with, then the number of hash buckets.

    Signatures, as (text, key, position): a pair (a, b) of ranks is key a*U + b with the position
    of b; a single element e of region r is key U*U + r*U + e with its position + 1. So for every kind
    a hit (x at position p, y at position q) is valid iff p <= |x| - o + 1 and q <= |y| - o + 1.
    Keys go to hash buckets (Fibonacci hashing), at least as many as index entries: two signatures
    sharing a bucket only cost extra hits, which the exact checks then reject."""
    n_texts, max_len = len(lens), int(lens.max())
    # per length: prefix sizes of the single-element (n - o + 1) and pair (n - o + 2) schemes, o the
    # least overlap any partner needs; "tiny" lengths can need an overlap of 1, too little for pairs
    prefix1 = np.zeros(max_len + 1, dtype=np.int64)
    for n in np.unique(lens[lens > 0]).tolist():
        prefix1[n] = n - _smallest_overlap(n, need) + 1
    prefix2 = np.minimum(prefix1 + 1, np.arange(max_len + 1))
    tiny_len = np.zeros(max_len + 1, dtype=bool)
    tiny_len[1:] = need[2: max_len + 2] <= 1
    long_ = prefix2[lens] > _PAIR_CAP
    tiny = tiny_len[lens]
    paired = (lens >= 2) & ~long_
    u = n_el
    n_index = (int((prefix2[lens[paired]] * (prefix2[lens[paired]] - 1) // 2).sum()) + int(lens[tiny].sum())
               + (int(prefix1[lens[long_]].sum()) + int(prefix1[lens].sum()) if long_.any() else 0))
    bits = max(10, n_index.bit_length())
    key_type = np.int32 if bits < 32 else np.int64

    def bucket(keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * _GOLDEN) >> np.uint64(64 - bits)).astype(key_type)

    def singles(which: np.ndarray, size: np.ndarray, region: int):
        t = np.flatnonzero(which)
        cnt = size[t]
        at = _ranges(offsets[t], cnt)
        rel = at - np.repeat(offsets[t], cnt)
        return np.repeat(t.astype(np.int32), cnt), bucket(u * u + region * u + elements[at]), (rel + 1).astype(np.int32)

    probe, index = [], []
    for size in np.unique(prefix2[lens[paired]]).tolist():
        t = np.flatnonzero(paired & (prefix2[lens] == size))
        first = elements[offsets[t][:, None] + np.arange(size)]
        ia, ib = np.triu_indices(size, 1)
        pairs = (np.repeat(t.astype(np.int32), len(ia)), bucket(first[:, ia] * u + first[:, ib]).ravel(),
                 np.tile(ib.astype(np.int32), len(t)))
        probe.append(pairs)
        index.append(pairs)
    if tiny.any():  # overlap 1 suffices between two tiny texts: any shared element
        probe.append(singles(tiny, lens, 0))
        index.append(probe[-1])
    if long_.any():  # long texts: the plain prefix filter, both ways
        probe.append(singles(~long_ & (lens > 0), prefix1[lens], 1))  # short probes meet long texts ...
        index.append(singles(long_, prefix1[lens], 1))
        probe.append(singles(long_, prefix1[lens], 2))  # ... long probes meet everything
        index.append(singles(lens > 0, prefix1[lens], 2))

    def table(parts):  # text by text
        t, k, p = (np.concatenate(x) for x in zip(*parts, strict=True))
        order = np.argsort(t, kind="stable")  # a merge of sorted runs
        start = np.searchsorted(t[order], np.arange(n_texts + 1))
        return k[order], p[order], start

    return (*table(index), *table(probe), 1 << bits)


def rouge_dedup(candidates: Sequence[str], threshold: float = 0.7, existing: Sequence[str] = (),
                inclusive: bool = False) -> DedupResult:
    """Keep each candidate, in order, unless its ROUGE-L to an existing or already-kept text is
    above `threshold` (or equal, with `inclusive`). Same result as `naive_dedup` -- the same keep
    list and, for a dropped candidate, the same closest kept text and score -- with far fewer LCS."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    texts = [rouge_tokens(t) for t in (*existing, *candidates)]
    n_texts, n_existing = len(texts), len(existing)
    lens = np.fromiter(map(len, texts), np.int64, n_texts)
    if not n_texts or not lens.any():  # no tokens anywhere: every ROUGE-L is 0, everything stays
        return DedupResult([True] * len(candidates), [None] * len(candidates), [0.0] * len(candidates), 0)
    elements, n_el = _elements(texts, lens)
    offsets = np.zeros(n_texts + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    max_len = int(lens.max())
    need = _overlap_table(threshold, inclusive, 2 * max_len)

    i_key, i_pos, i_start, p_key, p_pos, p_start, n_buckets = _signatures(lens, offsets, elements, n_el, need)
    # the index: bucket -> the kept texts under it, coded (text << qbits) | position, in the bucket's
    # slice of one array that has room for every text that could be kept
    base = np.zeros(n_buckets + 1, dtype=np.int64)
    np.cumsum(np.bincount(i_key, minlength=n_buckets), out=base[1:])
    fill = np.zeros(n_buckets, dtype=np.int32)
    postings = np.zeros(int(base[-1]), dtype=np.int64)
    qbits = max_len.bit_length() + 1
    qmask = (1 << qbits) - 1

    def add(kept_texts: np.ndarray) -> None:
        sizes = i_start[kept_texts + 1] - i_start[kept_texts]
        at = _ranges(i_start[kept_texts], sizes)
        if not len(at):
            return
        order = np.argsort(i_key[at], kind="stable")
        at = at[order]
        ks = i_key[at]
        first = np.ones(len(ks), dtype=bool)
        first[1:] = ks[1:] != ks[:-1]
        idx = np.arange(len(ks))
        starts = np.maximum.accumulate(np.where(first, idx, 0))
        postings[base[ks] + fill[ks] + idx - starts] = (np.repeat(kept_texts, sizes)[order] << qbits) | i_pos[at]
        heads = np.flatnonzero(first)
        fill[ks[heads]] += np.diff(heads, append=len(ks))

    def valid(x, p, y, q):
        n, m = lens[x], lens[y]
        o = need[n + m]
        return (p <= n - o + 1) & (q <= m - o + 1)

    kept = np.ones(n_texts, dtype=bool)
    if n_existing:
        add(np.arange(n_existing))
    keep, match, score, comps = [], [], [], 0
    for b0 in range(n_existing, n_texts, _BLOCK):
        b1 = min(b0 + _BLOCK, n_texts)
        lo, hi = p_start[b0], p_start[b1]
        px = np.repeat(np.arange(b0, b1), np.diff(p_start[b0: b1 + 1]))
        pk, pp = p_key[lo:hi], p_pos[lo:hi]
        found_pairs = [np.zeros(0, dtype=np.int64)]
        # against the index of everything kept before the block
        sizes = fill[pk]
        for c in _chunks(sizes):
            at = _ranges(base[pk[c]], sizes[c])
            code = postings[at]
            x, y = np.repeat(px[c], sizes[c]), code >> qbits
            ok = valid(x, np.repeat(pp[c], sizes[c]), y, code & qmask)
            found_pairs.append(x[ok] * n_texts + y[ok])
        # inside the block: every earlier text of the block, kept or not (decided below), through a
        # small hash table of the block's own signatures
        ilo, ihi = i_start[b0], i_start[b1]
        bk = i_key[ilo:ihi]
        slot_mask = (1 << max(4, (2 * len(bk)).bit_length())) - 1
        order = np.argsort(bk & slot_mask, kind="stable")
        bk, by = bk[order], np.repeat(np.arange(b0, b1), np.diff(i_start[b0: b1 + 1]))[order]
        bq = i_pos[ilo:ihi][order]
        slot_start = np.zeros(slot_mask + 2, dtype=np.int64)
        np.cumsum(np.bincount(bk & slot_mask, minlength=slot_mask + 1), out=slot_start[1:])
        first_at = slot_start[pk & slot_mask]
        counts = slot_start[(pk & slot_mask) + 1] - first_at
        for c in _chunks(counts):
            at = _ranges(first_at[c], counts[c])
            x, y = np.repeat(px[c], counts[c]), by[at]
            ok = (y < x) & (bk[at] == np.repeat(pk[c], counts[c]))
            ok &= valid(x, np.repeat(pp[c], counts[c]), y, bq[at])
            found_pairs.append(x[ok] * n_texts + y[ok])
        pair = np.unique(np.concatenate(found_pairs))  # sorted: by probe, then by partner
        x, y = pair // n_texts, pair % n_texts
        # exact bag overlap (it bounds the LCS): look each element of y up among x's elements
        if len(pair):
            mine = (np.repeat(np.arange(b1 - b0), lens[b0:b1]) * n_el
                    + elements[offsets[b0]: offsets[b1]])  # ascending: by text, then rank
            ok = np.zeros(len(pair), dtype=bool)
            for c in _chunks(lens[y]):
                m = lens[y[c]]
                look = np.repeat((x[c] - b0) * n_el, m) + elements[_ranges(offsets[y[c]], m)]
                where = np.minimum(np.searchsorted(mine, look), len(mine) - 1)
                shared = np.zeros(len(look) + 1, dtype=np.int64)
                np.cumsum(mine[where] == look, out=shared[1:])
                ends = np.cumsum(m)
                ok[c] = shared[ends] - shared[ends - m] >= need[lens[x[c]] + m]
            x, y = x[ok].tolist(), y[ok].tolist()
        else:
            x, y = [], []
        # decide in order; a partner counts only if kept (those before the block all are)
        k = 0
        for i in range(b0, b1):
            best, best_i = 0.0, None
            while k < len(x) and x[k] == i:
                j = y[k]
                k += 1
                if kept[j]:
                    comps += 1
                    s = rouge_l(texts[i], texts[j])
                    if s > best:  # ascending partners: ties go to the earliest, as in naive_dedup
                        best, best_i = s, j
            dup = best_i is not None and is_duplicate(best, threshold, inclusive)
            kept[i] = not dup
            keep.append(not dup)
            match.append(best_i if dup else None)
            score.append(best if dup else 0.0)
        add(np.flatnonzero(kept[b0:b1]) + b0)
    return DedupResult(keep, match, score, comps)
