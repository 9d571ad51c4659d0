"""How a chat becomes text for a base model.

Base models have no chat template, so selfalign renders dialogues in the plain transcript
format that the HHH laboratory and ALMoST papers used: turns opened by `Human:` and
`Assistant:`, separated by blank lines, with an optional system text on top. A model that
ships its own chat template can use it instead (`chat_format: model` on the engine).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

USER_TAG = "Human:"
ASSISTANT_TAG = "Assistant:"
ROLE_TAGS = {"user": USER_TAG, "assistant": ASSISTANT_TAG}

# A speaker's tag of a dialogue transcript: text containing one is writing the other side's turn.
# Case-sensitive, as transcripts write them ("Human:", "User:", "Assistant:", a space before the colon
# allowed); "the user: a person" in running text is no marker. Used by the self-instruct and the
# synthetic-comparison filters alike.
ROLE_MARKER = re.compile(r"\b(Human|User|Assistant)\s*:")
# Stop a base model from writing the next turn itself: the user's, or a second turn of its own (a
# base model often answers "...\n\nAssistant: <the question again>" and loops; issue #13).
PLAIN_STOPS = ["\nHuman:", "\n\nHuman", "\nAssistant:"]

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


def plain_chat_template(bos_token: str | None = None) -> str:
    """A Jinja chat template that renders exactly what `render_plain` renders.

    Saved with every trained model and export, so `tokenizer.apply_chat_template`, vLLM, llama.cpp
    and Ollama give the model the transcript format it was trained on. `bos_token` is written first
    when the tokenizer adds one itself (`tokenizer(text)` starts with it): servers tokenize a
    rendered chat without special tokens, so the template must carry the BOS training saw.
    Roles other than system/user/assistant, or a system message that is not first, raise.
    """
    lines = [
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'system' and not loop.first -%}"
        "{{ raise_exception('a system message may only come first') }}{%- endif -%}",
        "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}",
        "{%- if message['role'] == 'system' -%}{{ message['content'] | trim }}",
        f"{{%- elif message['role'] == 'user' -%}}{{{{ '{USER_TAG} ' + (message['content'] | trim) }}}}",
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{ '{ASSISTANT_TAG} ' + (message['content'] | trim) }}}}",
        "{%- else -%}{{ raise_exception('unknown role ' + message['role'] + ' (system, user or assistant)') }}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{ '\\n\\n{ASSISTANT_TAG}' }}}}{{%- endif -%}}",
    ]
    head = "{{- bos_token -}}" if bos_token else ""
    return head + "".join(lines)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of plain text by itself."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def attach_plain_template(tokenizer):
    """Give `tokenizer` the plain-transcript chat template (replacing any other): a model trained on
    `render_plain` text should be prompted with it everywhere it is loaded. Returns the tokenizer."""
    tokenizer.chat_template = plain_chat_template(tokenizer.bos_token if adds_bos(tokenizer) else None)
    return tokenizer


def first_stop(text: str, stops: Sequence[str]) -> str | None:
    """The stop string that occurs earliest in `text` (what ended a completion), or None."""
    hits = [(i, s) for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits)[1] if hits else None


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; say whether one was found."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
