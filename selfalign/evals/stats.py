"""Intervals for the numbers the report shows, so a reader can tell a change from noise.

- `wilson`: the 95% Wilson score interval of a rate k/n. Unlike the normal approximation it stays
  inside [0, 1] and is sensible at k = 0 or k = n, which the behaviour eval hits often (a model
  that never echoes, one that always loops).
- `paired_bootstrap`: the 95% percentile interval of mean(after - before) over items scored by both
  models. Pairing matters: the same HHH item is easy or hard for both models, so resampling items
  (not the two models' scores apart) removes that shared variance and gives a much narrower, still
  honest interval. Seeded, so a report is reproducible.

A change is called real only when its interval excludes zero (`is_real`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of the rate k/n; (0, 1) when n is 0 (nothing is known)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k <= 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends (not 1 - 1e-16)
    high = 1.0 if k >= n else min(1.0, centre + half)
    return low, high


def paired_bootstrap(before: Sequence[float], after: Sequence[float], n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Mean change after - before over paired items and its percentile bootstrap interval.

    Returns {"delta", "low", "high", "n"}. Raises ValueError on unpaired or empty input: a change
    is only meaningful over the same items."""
    b = np.asarray(before, dtype=float)
    a = np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"paired bootstrap needs two equal-length lists (got {b.shape} and {a.shape})")
    if b.size == 0:
        raise ValueError("paired bootstrap needs at least one item")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # in blocks: n_boot x n indices at once can be large
        stop = min(n_boot, start + 256)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"delta": float(diff.mean()), "low": float(low), "high": float(high), "n": int(diff.size)}


def is_real(interval: dict) -> bool:
    """A change counts only when its interval excludes zero."""
    return interval["low"] > 0 or interval["high"] < 0
