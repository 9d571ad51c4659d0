import pytest

from selfalign.core.errors import SelfAlignError
from selfalign.core.hhh_prompt import load_hhh_prompt, render_hhh_prompt


def test_shipped_hhh_prompt_has_14_well_formed_dialogues():
    data = load_hhh_prompt()
    assert len(data["dialogues"]) == 14
    assert sum(1 for d in data["dialogues"] if sum(t["role"] == "user" for t in d["turns"]) >= 2) >= 4  # multi-turn
    text = render_hhh_prompt()
    assert text.startswith(data["preamble"].strip()[:40])
    assert text.count("\n\nAssistant: ") >= 14 and text.rstrip().endswith("-----")


def test_render_can_shorten():
    assert render_hhh_prompt(max_dialogues=2).count("-----") == 3  # after the preamble and each dialogue


def test_bad_hhh_prompt_file_names_the_problem(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("preamble: hi\ndialogues:\n  - turns: [{role: wizard, content: x}]\n")
    with pytest.raises(SelfAlignError, match=r"p.yaml: dialogues\[0\]: .*unknown role 'wizard'"):
        load_hhh_prompt(bad)
    (tmp_path / "q.yaml").write_text("just: text\n")
    with pytest.raises(SelfAlignError, match="needs `preamble`"):
        load_hhh_prompt(tmp_path / "q.yaml")


def test_hhh_prompt_as_chat_messages_and_through_a_chat_template():
    from transformers import PreTrainedTokenizerFast

    from selfalign.core.hhh_prompt import hhh_messages, render_hhh_chat
    from selfalign.core.tiny import build_byte_tokenizer

    data = load_hhh_prompt()
    msgs = hhh_messages(max_dialogues=2)
    assert msgs[0] == {"role": "system", "content": data["preamble"].strip()}
    turns = [t for d in data["dialogues"][:2] for t in d["turns"]]
    assert msgs[1:] == [{"role": t["role"], "content": t["content"]} for t in turns]
    assert render_hhh_prompt(max_dialogues=0).count("-----") == 1  # 0 dialogues means none, not all
    tok = build_byte_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    text = render_hhh_chat(tok, max_dialogues=2)
    assert text.startswith("<system>" + data["preamble"].strip()) and text.count("<assistant>") == sum(
        t["role"] == "assistant" for t in turns)
    tok.chat_template = None
    with pytest.raises(SelfAlignError, match="no chat template"):
        render_hhh_chat(tok)
