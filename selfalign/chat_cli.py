"""`selfalign chat MODEL`: talk to a model in the terminal.

The dialogue is rendered with `render_plain` and cut at `PLAIN_STOPS`, as every generation stage
does, so the model is prompted exactly as it was trained and evaluated. Replies stream as they are
generated (transformers' `TextIteratorStreamer`); text that might be the start of a stop string is
held back until it is clear it is not, so `Human:` never flashes on screen.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from threading import Thread

from selfalign.core.chat import PLAIN_STOPS, render_plain, truncate_at_stop

HELP = "type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits"


def stream_until_stop(chunks: Iterable[str], stops: list[str]) -> Iterator[str]:
    """Pass text chunks through, ending at the first stop string and never emitting any part of it.

    Holds back at most the longest stop's length minus one characters, the most that could be the
    start of a stop string still being written."""
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    for chunk in chunks:
        text += chunk
        cut, found = truncate_at_stop(text, stops)
        if found:
            if len(cut) > sent:
                yield cut[sent:]
            return
        safe = max(sent, len(text) - hold)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent:
        yield text[sent:]


@dataclass
class ChatSession:
    """The conversation so far; `prompt()` is what the model continues."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt(self, user: str) -> str:
        return render_plain(self.messages() + [{"role": "user", "content": user}])

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply.strip()}]

    def reset(self) -> None:
        self.turns = []


def generate_stream(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                    top_p: float) -> Iterator[str]:
    """Decoded text chunks of the model's continuation of `prompt`, as they are generated."""
    import torch
    from transformers import TextIteratorStreamer

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, stop_strings=list(PLAIN_STOPS),
                  tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id, **sampling)

    def work():
        with torch.no_grad():
            model.generate(**kwargs)

    thread = Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


def chat_loop(model, tokenizer, session: ChatSession, lines: Iterable[str], write, max_new_tokens: int = 256,
              temperature: float = 0.7, top_p: float = 0.9) -> ChatSession:
    """Read user lines, stream replies through `write`; returns the session at the end."""
    for raw in lines:
        user = raw.strip()
        if not user:
            continue
        if user in ("/exit", "/quit"):
            break
        if user == "/reset":
            session.reset()
            write("(conversation forgotten)\n")
            continue
        write("assistant> ")
        reply = ""
        for piece in stream_until_stop(generate_stream(model, tokenizer, session.prompt(user), max_new_tokens,
                                                       temperature, top_p), PLAIN_STOPS):
            reply += piece
            write(piece)
        write("\n")
        session.add(user, reply)
    return session


def _input_lines(prompt: str) -> Iterator[str]:
    interactive = sys.stdin.isatty()
    while True:
        try:
            yield input(prompt if interactive else "")
        except EOFError:
            return


def run_chat(target: str, system: str | None = None, stage: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None) -> None:
    from selfalign.core.models import load_model
    from selfalign.export import resolve_model_arg

    ref, _ = resolve_model_arg(target, stage)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    print(f"loading {ref} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(ref)
    print(f"chatting with {ref}; {HELP}", file=sys.stderr, flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(model, tokenizer, ChatSession(system=system), _input_lines("you> "), write, max_new_tokens,
              temperature, top_p)
