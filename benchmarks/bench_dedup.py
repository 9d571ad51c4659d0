"""ROUGE-L dedup: the indexed rule against the literal all-pairs rule, at 2k, 8k and 32k prompts.

    python benchmarks/bench_dedup.py [--sizes 2000,8000,32000] [--threshold 0.7]

Prompts are synthetic (templates with random near-duplicate edits, as self-instruct produces).
At 2k the naive rule is run in full, and both keep lists must be identical. Beyond that the naive
rule would take hours, so its time is estimated as (its exact number of comparisons, known from
the kept counts) × (its measured median time per comparison on a sample of pairs) — the estimate
is checked against the measured time at 2k and printed beside it.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_dedup import synthetic_prompts  # noqa: E402

from selfalign.dedup import naive_dedup, rouge_dedup, rouge_l, rouge_tokens  # noqa: E402


def per_pair_seconds(texts: list[str], samples: int = 20000) -> float:
    rng = random.Random(0)
    toks = [rouge_tokens(t) for t in texts]
    runs = []
    for _ in range(3):
        pairs = [(rng.choice(toks), rng.choice(toks)) for _ in range(samples)]
        t0 = time.perf_counter()
        for a, b in pairs:
            rouge_l(a, b)
        runs.append((time.perf_counter() - t0) / samples)
    return statistics.median(runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,8000,32000")
    ap.add_argument("--threshold", type=float, default=0.7)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"ROUGE-L dedup, threshold > {args.threshold}")
    print(f"{'prompts':>8} {'kept':>7} {'indexed s':>10} {'naive s':>12} {'speed-up':>9} {'LCS done':>10} {'naive LCS':>12}")
    prev = None
    for n in sizes:
        texts = synthetic_prompts(n, seed=1)
        t0 = time.perf_counter()
        fast = rouge_dedup(texts, args.threshold)
        t_fast = time.perf_counter() - t0
        kept_before = 0
        naive_comparisons = 0
        for k in fast.keep:
            naive_comparisons += kept_before
            kept_before += k
        est = naive_comparisons * per_pair_seconds(texts)
        if n <= 2000:
            t0 = time.perf_counter()
            slow = naive_dedup(texts, args.threshold)
            t_naive = time.perf_counter() - t0
            assert slow.keep == fast.keep, "the indexed rule kept different prompts"
            naive_txt = f"{t_naive:.1f}"
            print(f"{'':>8} (naive measured {t_naive:.1f} s, estimate {est:.1f} s)")
        else:
            t_naive = est
            naive_txt = f"~{est:.0f} est"
        # growth exponent: 1 is linear, 2 quadratic (the naive rule)
        growth = f"  time ~ n^{math.log(t_fast / prev[1]) / math.log(n / prev[0]):.2f}" if prev else ""
        print(f"{n:>8} {sum(fast.keep):>7} {t_fast:>10.2f} {naive_txt:>12} {t_naive / t_fast:>8.0f}x "
              f"{fast.comparisons:>10} {naive_comparisons:>12}{growth}", flush=True)
        prev = (n, t_fast)
    return 0


if __name__ == "__main__":
    sys.exit(main())
