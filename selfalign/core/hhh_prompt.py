"""The HHH prompt (Askell et al. 2021, section 2): a preamble and example dialogues of a helpful,
honest and harmless assistant, written for this project and kept as data in
`assets/hhh/prompt.yaml`. It renders to the plain `Human:/Assistant:` transcript that base models
continue, and is used as an inference-time system prompt (`--system hhh`), as the teacher's
context in context distillation, and as a prompt configuration in ALMoST's comparisons.
"""

from __future__ import annotations

from pathlib import Path

from selfalign.core.chat import render_plain
from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import read_yaml

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "hhh" / "prompt.yaml"
SEPARATOR = "\n\n-----\n\n"


def load_hhh_prompt(path: str | Path | None = None) -> dict:
    path = Path(path or DEFAULT_PATH)
    data = read_yaml(path, "HHH prompt")
    if not isinstance(data, dict) or "preamble" not in data or not isinstance(data.get("dialogues"), list):
        raise SelfAlignError(f"{path}: the HHH prompt needs `preamble` and a list of `dialogues`")
    for i, d in enumerate(data["dialogues"]):
        try:
            render_plain(d["turns"], add_generation_prompt=False)
        except (KeyError, TypeError, ValueError) as exc:
            raise SelfAlignError(f"{path}: dialogues[{i}]: {exc}") from None
    return data


def render_hhh_prompt(path: str | Path | None = None, max_dialogues: int | None = None) -> str:
    """Preamble, then each dialogue as a transcript, separated by a rule line."""
    data = load_hhh_prompt(path)
    dialogues = data["dialogues"] if max_dialogues is None else data["dialogues"][:max_dialogues]
    parts = [data["preamble"].strip()] + [render_plain(d["turns"], add_generation_prompt=False) for d in dialogues]
    return SEPARATOR.join(parts) + SEPARATOR.rstrip()


def hhh_messages(path: str | Path | None = None, max_dialogues: int | None = None) -> list[dict]:
    """The HHH prompt as chat messages: the preamble as the system message, then every example
    dialogue's turns as user/assistant messages (few-shot turns before the real conversation)."""
    data = load_hhh_prompt(path)
    dialogues = data["dialogues"] if max_dialogues is None else data["dialogues"][:max_dialogues]
    messages = [{"role": "system", "content": data["preamble"].strip()}]
    for d in dialogues:
        messages += [{"role": t["role"], "content": t["content"]} for t in d["turns"]]
    return messages


def render_hhh_chat(tokenizer, path: str | Path | None = None, max_dialogues: int | None = None) -> str:
    """The HHH prompt rendered with a tokenizer's own chat template (for chat-tuned models), as text
    that a conversation's rendered turns can follow."""
    if not getattr(tokenizer, "chat_template", None):
        raise SelfAlignError("this tokenizer has no chat template", "use the plain rendering (render_hhh_prompt)")
    return tokenizer.apply_chat_template(hhh_messages(path, max_dialogues), tokenize=False)
