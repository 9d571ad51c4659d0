import random
import re

import numpy as np
import pytest

import selfalign.core.dedup as dedup
from selfalign.core.dedup import lcs_length, naive_dedup, rouge_dedup, rouge_l, rouge_tokens


def lcs_dp(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_tokens_follow_rouge_score():
    assert (rouge_tokens("Write a poem -- about CATS, 3 of them!")
            == ["write", "a", "poem", "about", "cats", "3", "of", "them"])
    assert rouge_tokens("¿Qué?") == ["qu"]
    # rouge_score's rule: lower-case, replace every run of non-[a-z0-9] by a space, split
    rng = random.Random(0)
    alphabet = "aZ9 _-.,\t\nKé\u212a\u0130ß€\u3000"  # Kelvin sign and dotted I lower-case to ASCII letters
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        assert rouge_tokens(text) == re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == lcs_dp(a, b)


def test_rouge_l_by_hand():
    a = rouge_tokens("the cat sat on the mat")
    b = rouge_tokens("the cat lay on a mat")
    # LCS = the cat on mat = 4; F1 = 2*4/(6+6)
    assert rouge_l(a, b) == pytest.approx(8 / 12)
    assert rouge_l([], b) == 0.0


def test_threshold_boundary_exactly_0_7():
    # 7 shared words in order out of 10 each: ROUGE-L = 2*7/20 = 0.7 exactly
    a = "w1 w2 w3 w4 w5 w6 w7 x1 x2 x3"
    b = "w1 w2 w3 w4 w5 w6 w7 y1 y2 y3"
    assert rouge_l(rouge_tokens(a), rouge_tokens(b)) == 0.7
    assert rouge_dedup([b], 0.7, existing=[a]).keep == [True]  # > 0.7 drops; exactly 0.7 stays
    assert naive_dedup([b], 0.7, existing=[a]).keep == [True]
    assert rouge_dedup([b], 0.7, existing=[a], inclusive=True).keep == [False]  # ALMoST's >=
    c = "w1 w2 w3 w4 w5 w6 w7 x1 y2 y3"  # 8 of 10 in order: 0.8
    res = rouge_dedup([c], 0.7, existing=[a])
    assert res.keep == [False] and res.match == [0] and res.score == [pytest.approx(0.8)]


def test_in_order_against_kept_only():
    texts = ["tell me a joke about cats", "write a haiku about dogs", "tell me a joke about cats please",
             "explain quantum computing simply", "write me a haiku about two dogs"]
    # 3 vs 1: 2*6/13 = 0.92 (dropped); 5 vs 2: 2*5/12 = 0.83 (dropped); 2 vs 1: 2*2/11 (kept)
    res = rouge_dedup(texts, 0.7)
    assert res.keep == naive_dedup(texts, 0.7).keep == [True, True, False, True, False]


def synthetic_prompts(n, seed, vocab_size=4000):
    """Prompts shaped like self-instruct output: an opening verb phrase, then words drawn from a
    Zipf-distributed vocabulary of pseudo-words, 5 to 30 tokens; a third are near-duplicates of an
    earlier prompt (a few words inserted, dropped or replaced)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ra", "te", "su", "po", "ne", "vi", "do", "ha", "ze", "bu", "ro", "fi", "an"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                    for _ in range(vocab_size * 2)})[:vocab_size]
    rng.shuffle(vocab)
    weights = [1.0 / (r + 1) for r in range(len(vocab))]
    openers = ["write a", "explain how", "list five", "describe the", "give me", "what is the", "how do i",
               "suggest some", "compare the", "summarize this"]
    out = []
    for _ in range(n):
        if out and rng.random() < 0.33:
            words = rng.choice(out).split()
            for _ in range(rng.randint(1, 4)):
                op, pos = rng.random(), rng.randrange(len(words))
                if op < 0.4:
                    words.insert(pos, rng.choices(vocab, weights)[0])
                elif op < 0.7 and len(words) > 3:
                    words.pop(pos)
                else:
                    words[pos] = rng.choices(vocab, weights)[0]
        else:
            words = rng.choice(openers).split() + rng.choices(vocab, weights, k=rng.randint(3, 28))
        out.append(" ".join(words))
    return out


def literal_rule(candidates, threshold, existing=(), inclusive=False):
    """The all-pairs rule of `naive_dedup` -- every candidate's LCS with every kept text, closest
    one first in kept order -- with the LCS vectorised over all kept texts at once (bit-parallel over
    the candidate's tokens, one uint64 per kept text), so a few thousand prompts take seconds."""
    vocab = {}
    ids = [[vocab.setdefault(w, len(vocab)) for w in rouge_tokens(t)] for t in (*existing, *candidates)]
    assert max(map(len, ids)) < 64
    width = max(map(len, ids))
    rows = np.full((len(ids), width), len(vocab), dtype=np.int64)  # padding: a token nobody has
    for i, toks in enumerate(ids):
        rows[i, : len(toks)] = toks
    lens = np.array([len(t) for t in ids])
    kept = list(range(len(existing)))
    keep, match, score = [], [], []
    for i in range(len(existing), len(ids)):
        a, k = ids[i], np.array(kept, dtype=np.int64)
        best, best_i = 0.0, None
        if a and len(k):
            masks = np.zeros(len(vocab) + 1, dtype=np.uint64)
            for pos, tok in enumerate(a):
                masks[tok] |= np.uint64(1 << pos)
            full = np.uint64((1 << len(a)) - 1)
            v = np.full(len(k), full, dtype=np.uint64)
            for col in range(width):
                u = v & masks[rows[k, col]]
                v = ((v + u) | (v - u)) & full  # padding columns leave v as it is (u == 0)
            lcs = len(a) - np.bitwise_count(v).astype(np.int64)
            scores = [2.0 * x / (len(a) + m) if m else 0.0 for x, m in zip(lcs.tolist(), lens[k].tolist(), strict=True)]
            for j, sc in zip(kept, scores, strict=True):
                if sc > best:
                    best, best_i = sc, j
        dup = best_i is not None and (best >= threshold if inclusive else best > threshold)
        keep.append(not dup)
        match.append(best_i if dup else None)
        score.append(best if dup else 0.0)
        if not dup:
            kept.append(i)
    return keep, match, score


def test_vectorised_literal_rule_is_naive_dedup():
    texts = synthetic_prompts(300, seed=5)
    for threshold, inclusive in [(0.7, False), (0.5, True)]:
        slow = naive_dedup(texts[20:], threshold, existing=texts[:20], inclusive=inclusive)
        assert literal_rule(texts[20:], threshold, texts[:20], inclusive) == (slow.keep, slow.match, slow.score)


@pytest.mark.parametrize("threshold, inclusive", [(0.7, False), (0.5, True), (0.9, False)])
def test_same_prompts_kept_as_the_naive_rule(threshold, inclusive):
    texts = synthetic_prompts(3000, seed=int(threshold * 10))
    seeds = texts[:50]
    fast = rouge_dedup(texts[50:], threshold, existing=seeds, inclusive=inclusive)
    keep, match, score = literal_rule(texts[50:], threshold, seeds, inclusive)
    assert fast.keep == keep
    assert 0 < sum(keep) < len(keep)  # the case is not trivial
    assert fast.match == match  # a dropped prompt names the same closest kept one (first on ties)
    assert fast.score == score
    kept_before = len(seeds) + np.cumsum([0, *keep[:-1]])
    assert fast.comparisons < kept_before.sum() / 100  # the naive rule's number of LCS


def random_case(rng):
    vocab = [f"w{i}" for i in range(rng.choice([2, 4, 8, 30]))]
    texts = []
    for _ in range(rng.randint(0, 60)):
        if texts and rng.random() < 0.3:  # an edited copy
            words = rng.choice(texts).split()
            for _ in range(rng.randint(0, 3)):
                if words and rng.random() < 0.5:
                    words.pop(rng.randrange(len(words)))
                else:
                    words.insert(rng.randint(0, len(words)), rng.choice(vocab))
        else:  # lengths from empty, tiny (overlap 1 can suffice) to long (single-element signatures)
            words = rng.choices(vocab, k=rng.choice([0, 1, 2, 3, 5, 10, 25, 70, rng.randint(0, 12)]))
        texts.append(" ".join(words) if rng.random() > 0.05 else "?!")
    return texts


def test_random_cases_match_naive_exactly(monkeypatch):
    """Tiny vocabularies (many ties and overlaps), every length regime, and blocks/chunks of odd
    sizes so that block boundaries and split hit lists are crossed often."""
    rng = random.Random(7)
    for _ in range(150):
        monkeypatch.setattr(dedup, "_BLOCK", rng.choice([1, 3, 16, 1024]))
        monkeypatch.setattr(dedup, "_PAIR_CAP", rng.choice([2, 5, 32]))
        monkeypatch.setattr(dedup, "_CHUNK", rng.choice([1, 7, 1 << 22]))
        texts = random_case(rng)
        n_existing = rng.randint(0, len(texts))
        threshold = rng.choice([0.1, 0.3, 0.5, 0.55, 2 / 3, 0.7, 0.9, 1.0])
        inclusive = rng.random() < 0.5
        fast = rouge_dedup(texts[n_existing:], threshold, existing=texts[:n_existing], inclusive=inclusive)
        slow = naive_dedup(texts[n_existing:], threshold, existing=texts[:n_existing], inclusive=inclusive)
        assert (fast.keep, fast.match, fast.score) == (slow.keep, slow.match, slow.score), (threshold, inclusive)


def test_degenerate_inputs():
    assert rouge_dedup([]).keep == []
    assert rouge_dedup(["", "!!", ""], existing=["..."]).keep == [True, True, True]
    res = rouge_dedup(["same words here", "same words here", "Same, words here!"])
    assert res.keep == [True, False, False] and res.match == [None, 0, 0] and res.score == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        rouge_dedup(["a"], threshold=0.0)
