"""Preference accuracy of a reward model on comparison pairs.

Each row has a `prompt` (a string, or a chat as a list of messages), a `chosen` and a `rejected`
reply. The reward model scores both replies; the pair counts as right when the chosen reply gets
the higher reward, half right on an exact tie. Also reported: the mean margin (chosen reward minus
rejected reward) and the number of ties.

Simplifications: replies are plain strings (not TRL's conversational message lists); all rows
are scored in one call (no resumable row store: reward scoring is fast next to generation).
"""

from __future__ import annotations

import time
from pathlib import Path

from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import read_jsonl
from selfalign.core.pairs import PAIR_FIELDS, PAIR_HINT, pair_problem, pair_verdict

FIELDS = PAIR_FIELDS


def preference_accuracy(rm, rows: list[dict]) -> dict:
    """`rm` is anything with `score(prompts, responses) -> list[float]` (e.g. a `RewardModel`)."""
    if not rows:
        raise SelfAlignError("no comparison pairs to evaluate", "pass rows with prompt, chosen and rejected")
    t0 = time.time()
    n = len(rows)
    prompts = [r["prompt"] for r in rows]
    rewards = rm.score(prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    chosen, rejected = [float(x) for x in rewards[:n]], [float(x) for x in rewards[n:]]
    right = sum(pair_verdict(c, r) for c, r in zip(chosen, rejected, strict=True))
    return {
        "eval": "preference",
        "metrics": {
            "preference": {
                "accuracy": right / n,
                "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n,
                "ties": sum(c == r for c, r in zip(chosen, rejected, strict=True)),
            }
        },
        "counts": {"pairs": n},
        "rewards": {"chosen": chosen, "rejected": rejected},
        "wall_s": round(time.time() - t0, 3),
    }


def load_comparisons(path: str | Path) -> list[dict]:
    """Read comparison rows from JSONL; every error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SelfAlignError(f"comparison file {path} does not exist")
    rows = []
    for lineno, row in read_jsonl(path, "comparison file"):
        if problem := pair_problem(row):
            raise SelfAlignError(f"{path}:{lineno}: {problem}", PAIR_HINT)
        rows.append(row)
    if not rows:
        raise SelfAlignError(f"{path} holds no comparison rows",
                             "each line should be a JSON object with prompt, chosen and rejected")
    return rows
