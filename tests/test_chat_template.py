"""The exported/saved chat template renders exactly what training rendered (`render_plain`)."""

import pytest

from selfalign.core.chat import attach_plain_template, plain_chat_template, render_plain
from selfalign.core.tiny import build_byte_tokenizer

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a careful assistant.\n"}, {"role": "user", "content": "  What is 2+2? "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "line one\n\nline two"}, {"role": "assistant", "content": " ok "},
     {"role": "user", "content": "Human: tricky"}],
]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_template_without_bos_equals_render_plain(chat, generation_prompt):
    tok = build_byte_tokenizer()
    tok.chat_template = plain_chat_template(None)
    got = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    assert got == render_plain(chat, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("chat", CHATS)
def test_attached_template_gives_the_training_token_ids(chat):
    """Servers tokenize a rendered chat without special tokens; the BOS training saw comes from the template."""
    tok = attach_plain_template(build_byte_tokenizer())
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == tok.bos_token + render_plain(chat)
    served = tok(text, add_special_tokens=False)["input_ids"]
    trained = tok(render_plain(chat), add_special_tokens=True)["input_ids"]
    assert served == trained


def test_template_rejects_a_late_system_message_and_unknown_roles():
    tok = attach_plain_template(build_byte_tokenizer())
    with pytest.raises(Exception, match="system message may only come first"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], tokenize=False)
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "a"}], tokenize=False)
