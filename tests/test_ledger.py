"""The supervision ledger (selfalign.core.ledger): words as the unit, each text once, outside data
by rows, unreadable inputs as errors, and asset READMEs whose sizes stay true."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfalign.core.assets_io import ASSETS, yaml_key
from selfalign.core.errors import SelfAlignError
from selfalign.core.ledger import (
    HHH_SOURCE,
    asset_size,
    build_ledger,
    count_lines,
    count_words,
    gather,
    string_leaves,
)
from selfalign.stages import load_recipe, parse_recipe


def test_words_ignore_formatting_and_bookkeeping():
    assert count_words("A 146-word answer, on one line!") == count_words("A 146-word\n  answer,\non one line!") == 7
    assert count_lines("# a comment\n\none\n  two\n") == 2
    assert (string_leaves({"id": "x", "tag": "helpful", "turns": [{"role": "user", "content": "Hi there"}]})
            == ["Hi there"])


def test_each_text_counts_once():
    whole = "engraved: Be kind and brief.\nverbose: Be thorough."
    entries = gather([("builtin:self_align/system_prompts.yaml", whole),
                      ("builtin:self_align/system_prompts.yaml#engraved", "Be kind and brief."),
                      ("generate.system", "Be kind and  brief."),  # the same text, spaced differently
                      ("eval.system", "Other text."), ("eval2.system", "Other text.")])
    assert [e["source"] for e in entries] == ["builtin:self_align/system_prompts.yaml", "eval.system"]
    assert entries[0]["words"] == 6  # the values only: keys are not words a person wrote for the model


def test_every_spelling_of_the_hhh_prompt_is_its_asset_file():
    entries = gather([("hhh", "rendered text"), ("system:hhh", "rendered text")])
    assert [e["source"] for e in entries] == [HHH_SOURCE] and entries[0]["words"] > 1500


def test_quickstart_ledger_counts_templates_and_the_system_prompt_once():
    ledger = build_ledger(load_recipe("quickstart"))
    sources = [e["source"] for e in ledger["inputs"]]
    assert len(sources) == len(set(sources))
    assert "builtin:self_align/templates.yaml" in sources  # the prompt templates once written in code
    assert "builtin:self_align/system_prompts.yaml" in sources
    assert not any(s.endswith("#engraved") or s.endswith(".system") for s in sources)  # inside system_prompts.yaml
    assert ledger["words"] == sum(e["words"] for e in ledger["inputs"]) > 3000
    assert "settings" in ledger["not_counted"]


def test_outside_data_is_listed_with_rows_and_a_missing_file_is_an_error(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) for i in range(3)) + "\n")
    stage = {"stage": "reward_model", "data": str(data)}
    ledger = build_ledger(parse_recipe({"name": "x", "stages": [stage]}))
    assert (ledger["inputs"]
            == [{"source": str(data), "kind": "data", "stage": "reward_model", "field": "data", "rows": 3}])
    stage["data"] = str(tmp_path / "gone.jsonl")
    with pytest.raises(SelfAlignError, match=r"reward_model\.data: .*gone\.jsonl"):
        build_ledger(parse_recipe({"name": "x", "stages": [stage]}))


def test_an_unreadable_input_is_an_error_naming_the_stage(tmp_path):
    recipe = parse_recipe({"name": "x", "stages": [{"stage": "self_align", "principles": str(tmp_path / "none.yaml")}]})
    with pytest.raises(SelfAlignError, match=r"^self_align: a human-written input cannot be read: .*none\.yaml"):
        build_ledger(recipe)


def test_run_record_carries_the_ledger(private_cache, tmp_path):
    from selfalign.stages import run_recipe

    recipe = parse_recipe({"name": "x", "model": "tiny:llama", "stages": [
        {"stage": "generate", "prompts": "builtin:quickstart", "max_prompts": 1,
         "system": "builtin:self_align/system_prompts.yaml#engraved", "sampling": {"max_new_tokens": 2}}]})
    record = run_recipe(recipe, tmp_path / "run")
    assert record["supervision"]["words"] == sum(i["words"] for i in record["inputs"])
    engraved = yaml_key("builtin:self_align/system_prompts.yaml", "engraved")
    assert any(i["source"] == "generate.system" and i["words"] == count_words(engraved) for i in record["inputs"])


# -- the asset READMEs' numbers ---------------------------------------------------------------------
ROW = re.compile(r"^\| `([\w./]+)` \|.*\| ([\d,]+) \| ([\d,]+) \|$", re.M)


@pytest.mark.parametrize("folder", ["self_align", "almost"])
def test_readme_sizes_are_true(folder):
    """Each file row of the README's table ends in words | lines, as the ledger counts them."""
    text = (ASSETS / folder / "README.md").read_text(encoding="utf-8")
    rows = ROW.findall(text)
    files = sorted(p.name for p in (ASSETS / folder).iterdir() if p.suffix in (".yaml", ".txt"))
    assert sorted(r[0] for r in rows) == files
    for name, words, lines in rows:
        size = asset_size(f"builtin:{folder}/{name}")
        assert (int(words.replace(",", "")), int(lines.replace(",", ""))) == (size["words"], size["lines"]), name


def test_hhh_readme_word_count_is_true():
    text = (ASSETS / "hhh" / "README.md").read_text(encoding="utf-8")
    words = asset_size("builtin:hhh/prompt.yaml")["words"]
    assert f"| words a person wrote (the ledger's count) | {words:,} |" in text
    assert Path(ASSETS / "hhh" / "prompt.yaml").exists()
