"""Comparison pairs `{"prompt", "chosen", "rejected"}`: the one shape every preference stage, trainer
and evaluation reads, its one validity rule, and the one way a scored pair is judged."""

from __future__ import annotations

from typing import Any

PAIR_FIELDS = ("prompt", "chosen", "rejected")
PAIR_HINT = "each comparison needs prompt, chosen and rejected"


def pair_problem(row: Any) -> str | None:
    """What makes `row` unusable as a comparison, or None: a missing field, a reply that is not a
    string, a prompt that is neither a string nor a list of messages."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    for key in PAIR_FIELDS:
        if key not in row:
            return f"missing field {key!r}"
    if not isinstance(row["prompt"], str | list):
        return "'prompt' must be a string or a list of messages"
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], str):
            return f"{key!r} must be a string, got {type(row[key]).__name__}"
    return None


def pair_verdict(better: float, worse: float) -> float:
    """1 if the reply that should win scored higher, 0 if lower, 0.5 on a tie (half credit, so a
    scorer that cannot tell the two apart gets chance, not zero)."""
    return 1.0 if better > worse else 0.0 if better < worse else 0.5
