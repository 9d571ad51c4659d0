"""`selfalign chat`: streaming replies cut at the transcript's stop strings, history, /reset, /exit."""

from __future__ import annotations

import subprocess
import sys

from selfalign.chat_cli import ChatSession, chat_loop, stream_until_stop
from selfalign.core.chat import PLAIN_STOPS, render_plain


def test_stream_stops_before_a_stop_string_split_across_chunks():
    chunks = ["Sure", ", here it is.", "\n", "Hu", "man: and", " more"]
    assert "".join(stream_until_stop(chunks, PLAIN_STOPS)) == "Sure, here it is."
    assert "".join(stream_until_stop(["a\nH", "i there"], PLAIN_STOPS)) == "a\nHi there"
    assert list(stream_until_stop([], PLAIN_STOPS)) == []


def test_session_renders_history_like_generation():
    s = ChatSession(system="Be brief.")
    s.add("Hi", " Hello! ")
    expected = render_plain([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}])
    assert s.prompt("Again") == expected
    s.reset()
    assert s.prompt("x") == "Be brief.\n\nHuman: x\n\nAssistant:"


def test_chat_loop_streams_and_keeps_history(private_cache, monkeypatch):
    import selfalign.chat_cli as chat_cli

    seen = []

    def fake_stream(model, tokenizer, prompt, *args):
        seen.append(prompt)
        yield from ["Fine", " thanks", "\n\nHuman: no"]

    monkeypatch.setattr(chat_cli, "generate_stream", fake_stream)
    out = []
    session = chat_loop(None, None, ChatSession(), ["hello", "", "how are you?", "/reset", "again", "/exit", "never"],
                        out.append)
    assert seen[1] == render_plain([{"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": "Fine thanks"},
                                    {"role": "user", "content": "how are you?"}])
    assert seen[2] == render_plain([{"role": "user", "content": "again"}])  # /reset forgot the rest
    assert len(seen) == 3 and "".join(out).count("assistant> Fine thanks\n") == 3
    assert "(conversation forgotten)" in "".join(out) and len(session.turns) == 2


def test_chat_command_answers_through_stdin(private_cache):
    """The real command on a tiny model: a reply streams for each line, /exit ends it, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "selfalign.cli", "chat", "tiny:llama", "--max-new-tokens", "6", "--temperature", "0",
         "--system", "Be brief."],
        input="Hello there\n/reset\nWhat is 2+2?\n/exit\n", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant> ") == 2 and "(conversation forgotten)" in proc.stdout
    assert "chatting with tiny:llama" in proc.stderr and "Traceback" not in proc.stderr
