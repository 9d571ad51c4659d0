"""One error type for everything a user can fix.

The CLI prints a `SelfAlignError` as one line (plus its hint) instead of a traceback; anything
else is a bug and keeps its traceback under `--debug`.
"""

from __future__ import annotations


class SelfAlignError(Exception):
    """A problem with the user's input or environment, with a hint on what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"
