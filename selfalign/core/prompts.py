"""Prompt files: what `generate` and the method stages read prompts from.

    file.txt     one prompt a line; blank lines and lines starting with '#' are skipped
    file.jsonl   one object a line with "prompt" (text) or "messages" (a chat), optional "id"
    file.yaml    a list of prompts: strings, or mappings with "prompt" (or "instruction" + optional "input")
    builtin:X    a prompt set shipped in selfalign/assets/prompts/X.txt (written by this project)
    builtin:DIR/FILE.yaml   any prompt file among the package's assets, e.g. builtin:almost/seed_prompts.yaml
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from selfalign.core.assets_io import ASSETS, read_yaml_list
from selfalign.core.chat import validate_messages
from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import check_name, parse_json_line, read_text
from selfalign.core.store import row_id


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str | None = None  # a plain instruction
    messages: tuple | None = None  # or a chat (tuple of message dicts)

    def as_request(self, system: str | None = None, chat: bool = True):
        """A request for an engine: the instruction as a user turn (under `system`), or raw text."""
        if self.messages is not None:
            msgs = list(self.messages)
            if system and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": system}, *msgs]
            return msgs
        if not chat:
            return f"{system}\n\n{self.text}" if system else self.text
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": self.text}]


def check_prompts_fit(engine, prompts: list[Prompt], requests: list, source: str) -> None:
    """A prompt longer than the model's context would lose its start without a word (engines keep the
    last tokens): refuse it by id instead. Engines without a local tokenizer (openai) are the
    server's business."""
    tok, limit = getattr(engine, "tokenizer", None), getattr(engine, "max_length", None)
    if tok is None or not limit:
        return
    for prompt, request in zip(prompts, requests, strict=True):
        text = engine.render(request)
        if len(text) < limit:  # a token is at least one character: it fits without counting
            continue
        n = len(tok(text, add_special_tokens=True)["input_ids"])
        if n > limit:
            raise SelfAlignError(f"{source}: prompt {prompt.id} is {n} tokens, longer than the model's context of "
                                 f"{limit} tokens", "shorten or split it, or use a model with a longer context")


def capped(prompts: list, cap: int | None, seed: int) -> list:
    """At most `cap` prompts, a seeded sample in their original order (not just the first ones: an
    earlier stage lists its prompts by source, and a cap should see every source)."""
    if not cap or cap >= len(prompts):
        return prompts
    keep = set(random.Random(seed).sample(range(len(prompts)), cap))
    return [p for i, p in enumerate(prompts) if i in keep]


def builtin_prompt_sets() -> list[str]:
    return sorted(p.stem for p in (ASSETS / "prompts").glob("*.txt"))


def _resolve_path(ref: str) -> Path:
    if ref.startswith("builtin:") and Path(ref.split(":", 1)[1]).suffix:
        from selfalign.core.assets_io import asset_path

        return asset_path(ref)
    if ref.startswith("builtin:"):
        name = check_name(ref.split(":", 1)[1], "built-in prompt set")
        path = ASSETS / "prompts" / f"{name}.txt"
        if not path.exists():
            raise SelfAlignError(f"no built-in prompt set {name!r}", f"available: {', '.join(builtin_prompt_sets())}")
        return path
    path = Path(ref).expanduser()
    if not path.exists():
        raise SelfAlignError(f"prompt file {path} does not exist", "pass a .txt (one prompt a line) or .jsonl file")
    if path.is_dir():
        raise SelfAlignError(f"prompt file {path} is a folder", "pass a .txt or .jsonl file")
    return path


def prompt_file_text(ref: str) -> str:
    """The text of a prompt file without its comment lines (what a person wrote)."""
    lines = read_text(_resolve_path(ref), "prompt file").splitlines()
    return "\n".join(x for x in lines if x.strip() and not x.lstrip().startswith("#"))


def load_prompts(ref: str) -> list[Prompt]:
    """Read a prompt file; errors name the file and line. Duplicate prompts are kept once."""
    path = _resolve_path(ref)
    lines = read_text(path, "prompt file").splitlines()
    prompts: list[Prompt] = []
    if path.suffix.lower() in (".yaml", ".yml"):
        return _dedup(_yaml_prompts(path))
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    by_id: dict[str, tuple[int, Prompt]] = {}  # id -> (line, prompt) of its first use
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        prompt = (
            _jsonl_prompt(path, lineno, line) if jsonl else Prompt(row_id("prompt", line.strip()), text=line.strip())
        )
        first = by_id.setdefault(prompt.id, (lineno, prompt))
        if first[1] != prompt:
            # two different prompts under one id would share one row: the second would be skipped as
            # "already answered" without a word. The same prompt twice is harmless and kept once.
            raise SelfAlignError(
                f"{path}:{lineno}: id {prompt.id!r} is already used by a different prompt on line {first[0]}",
                "give every prompt its own id (or drop the id field)",
            )
        prompts.append(prompt)
    if not prompts:
        raise SelfAlignError(
            f"{path} holds no prompts", "write one prompt a line (.txt) or one JSON object a line (.jsonl)"
        )
    return _dedup(prompts)


def _jsonl_prompt(path: Path, lineno: int, line: str) -> Prompt:
    obj = parse_json_line(line, path, lineno)
    if not isinstance(obj, dict) or not ({"prompt", "messages"} & obj.keys()):
        raise SelfAlignError(f"{path}:{lineno}: each line needs a 'prompt' (text) or 'messages' (chat) field")
    if "messages" in obj:
        try:
            validate_messages(obj["messages"])
        except ValueError as exc:
            raise SelfAlignError(f"{path}:{lineno}: messages: {exc}") from None
        msgs = tuple({"role": m["role"], "content": m["content"]} for m in obj["messages"])
        return Prompt(str(obj.get("id") or row_id("chat", msgs)), messages=msgs)
    if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
        raise SelfAlignError(f"{path}:{lineno}: prompt: must be a non-empty string")
    text = obj["prompt"].strip()
    return Prompt(str(obj.get("id") or row_id("prompt", text)), text=text)


def _dedup(prompts: list[Prompt]) -> list[Prompt]:
    seen: set[str] = set()
    return [p for p in prompts if not (p.id in seen or seen.add(p.id))]


def _yaml_prompts(path: Path) -> list[Prompt]:
    data = read_yaml_list(path, "prompts")
    prompts = []
    for i, entry in enumerate(data):
        if isinstance(entry, dict):
            text = entry.get("prompt") or entry.get("instruction")
            if isinstance(text, str) and isinstance(entry.get("input"), str) and entry["input"].strip():
                text = f"{text.strip()}\n\n{entry['input'].strip()}"
        else:
            text = entry
        if not isinstance(text, str) or not text.strip():
            raise SelfAlignError(
                f"{path}: entry {i}: expected a prompt (a string, or a mapping with `prompt` or `instruction`)"
            )
        prompts.append(Prompt(row_id("prompt", text.strip()), text=text.strip()))
    return prompts
