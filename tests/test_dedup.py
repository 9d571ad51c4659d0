import random

import pytest

from selfalign.dedup import lcs_length, naive_dedup, rouge_dedup, rouge_l, rouge_tokens


def lcs_dp(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_tokens_follow_rouge_score():
    assert rouge_tokens("Write a poem -- about CATS, 3 of them!") == ["write", "a", "poem", "about", "cats", "3", "of", "them"]
    assert rouge_tokens("¿Qué?") == ["qu"]


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
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(vocab_size * 2)})[:vocab_size]
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


@pytest.mark.parametrize("threshold, inclusive", [(0.7, False), (0.5, True), (0.9, False)])
def test_same_prompts_kept_as_the_naive_rule(threshold, inclusive):
    texts = synthetic_prompts(2500, seed=int(threshold * 10))
    seeds = texts[:50]
    fast = rouge_dedup(texts[50:], threshold, existing=seeds, inclusive=inclusive)
    slow = naive_dedup(texts[50:], threshold, existing=seeds, inclusive=inclusive)
    assert fast.keep == slow.keep
    assert 0 < sum(fast.keep) < len(fast.keep)  # the case is not trivial
    assert fast.comparisons < slow.comparisons / 10
    for f_score, s_score, k in zip(fast.score, slow.score, fast.keep, strict=True):
        if not k:
            assert f_score == pytest.approx(s_score)  # a dropped prompt names its closest kept one
