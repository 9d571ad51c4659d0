"""ROUGE-L dedup: the indexed rule against the literal all-pairs rule, at 2k, 8k and 32k prompts.

    python benchmarks/bench_dedup.py [--sizes 2000,8000,32000,64000] [--threshold 0.7] [--repeats 3]

Prompts are synthetic (tests/test_dedup.py: an opening verb phrase, then Zipf-distributed words from
a fixed 4000-word vocabulary, a third of them near-duplicates of an earlier prompt). A fixed
vocabulary is the hard case for an index: real prompt sets keep meeting new words as they grow, so
their rare words stay rarer; `--vocab` makes it harder still.

The indexed rule is timed `--repeats` times per size; the medians (wall clock and process CPU
time, which other processes on a shared machine disturb less) are printed, with the growth
exponent between consecutive sizes (time ~ n^k: 1 is linear, the naive rule is 2). At <= 2000
prompts the naive rule is run in full and both results must agree (kept prompts, closest kept
prompt, score). Beyond that it would take hours, so its time is estimated as (its exact number of
LCS computations, known from the kept counts) x (its median time per LCS on a sample of pairs);
the estimate is printed beside the measured time at 2000.
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

from selfalign.core.dedup import naive_dedup, rouge_dedup, rouge_l, rouge_tokens  # noqa: E402


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


def timed(texts: list[str], threshold: float, repeats: int):
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        res = rouge_dedup(texts, threshold)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return res, statistics.median(walls), statistics.median(cpus), walls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,8000,32000")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the indexed rule per size (median)")
    ap.add_argument("--vocab", type=int, default=4000, help="vocabulary of the synthetic prompts")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"ROUGE-L dedup, threshold > {args.threshold}, vocabulary {args.vocab}, median of {args.repeats} runs")
    print(f"{'prompts':>8} {'kept':>7} {'wall s':>8} {'cpu s':>8} {'naive s':>12} {'speed-up':>9} "
          f"{'LCS done':>9} {'naive LCS':>12}  growth (wall, cpu)")
    prev = None
    for n in sizes:
        texts = synthetic_prompts(n, seed=1, vocab_size=args.vocab)
        fast, wall, cpu, walls = timed(texts, args.threshold, args.repeats)
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
            assert (slow.keep, slow.match, slow.score) == (fast.keep, fast.match, fast.score), "results differ"
            naive_txt = f"{t_naive:.1f}"
            print(f"{'':>8} (naive measured {t_naive:.1f} s, estimate {est:.1f} s; same result)")
        else:
            t_naive = est
            naive_txt = f"~{est:.0f} est"
        growth = ""
        if prev:
            k_wall = math.log(wall / prev[1]) / math.log(n / prev[0])
            k_cpu = math.log(cpu / prev[2]) / math.log(n / prev[0])
            growth = f"  n^{k_wall:.2f}, n^{k_cpu:.2f} from {prev[0]}"
        print(f"{n:>8} {sum(fast.keep):>7} {wall:>8.2f} {cpu:>8.2f} {naive_txt:>12} {t_naive / wall:>8.0f}x "
              f"{fast.comparisons:>9} {naive_comparisons:>12}{growth}   runs {[round(w, 2) for w in walls]}",
              flush=True)
        prev = (n, wall, cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
