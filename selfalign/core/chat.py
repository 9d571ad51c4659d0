"""How a chat becomes text for a base model.

Base models have no chat template, so selfalign renders dialogues in the plain transcript
format that the HHH laboratory and ALMoST papers used: turns opened by `Human:` and
`Assistant:`, separated by blank lines, with an optional system text on top. A model that
ships its own chat template can use it instead (`chat_format: model` on the engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

USER_TAG = "Human:"
ASSISTANT_TAG = "Assistant:"
ROLE_TAGS = {"user": USER_TAG, "assistant": ASSISTANT_TAG}

# Stops a base model from writing the user's next turn itself.
PLAIN_STOPS = ["\nHuman:", "\n\nHuman"]

Message = dict[str, Any]
Request = str | Sequence[Message]


def is_chat(request: Request) -> bool:
    return not isinstance(request, str)


def validate_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("a chat request needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} needs 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {m['role']!r} (system, user or assistant)")
        if m["role"] == "system" and i != 0:
            raise ValueError("a system message may only come first")


def render_plain(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """`[system]\\n\\nHuman: ...\\n\\nAssistant: ...` and, if asked, a trailing `\\n\\nAssistant:`."""
    validate_messages(messages)
    parts = []
    for m in messages:
        content = str(m["content"]).strip()
        if m["role"] == "system":
            parts.append(content)
        else:
            parts.append(f"{ROLE_TAGS[m['role']]} {content}")
    text = "\n\n".join(parts)
    if add_generation_prompt:
        text += f"\n\n{ASSISTANT_TAG}"
    return text


def render(messages: Sequence[Message], tokenizer=None, chat_format: str = "plain") -> str:
    """Render a chat to the prompt text a model continues with the assistant's reply."""
    if chat_format == "model":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_format 'model' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if chat_format != "plain":
        raise ValueError(f"unknown chat_format {chat_format!r} (plain or model)")
    return render_plain(messages)


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; say whether one was found."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
