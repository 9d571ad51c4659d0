import json

import pytest

from selfalign.core.engines.base import Completion, Engine
from selfalign.core.errors import SelfAlignError
from selfalign.core.pipeline import RunContext
from selfalign.methods.self_align import self_align as sa
from selfalign.stages import parse_recipe

EXEMPLAR_NGRAMS = sa.word_ngrams("the quick brown fox jumps over the lazy dog near the river bank", sa.LEAK_NGRAM)


@pytest.mark.parametrize("completion, why", [
    (" Ethical applies.\n\nAssistant: Here is a safe way to do it.", None),
    (" Ethical applies, nothing more.", "malformed: no internal thoughts or no answer"),
    ("\n\nAssistant: An answer with no thoughts.", "malformed: no internal thoughts or no answer"),
    (" Thinking.\n\nAssistant:   ", "malformed: no internal thoughts or no answer"),
    (" Helpful.\n\nAssistant: Water boils at 100 C. It is hot. Water boils at 100 C.", "repeated sentence"),
    (" Helpful.\n\nAssistant: I don't know the time, I don't know the time, I don't know the time either",
     "a phrase loops"),
    (" Helpful.\n\nAssistant: Stir the sauce well, stir the sauce well.", None),  # the 4-word run only twice
    (" Candor.\n\nAssistant: As I said, the quick brown fox jumps over the lazy dog near here.", "copies an exemplar"),
    (" Ethical.\n\nAssistant: I'm sorry, but I cannot help with that.", "opens with a refusal formula"),
    (" Ethical.\n\nAssistant: As an AI, I have no opinions.", "opens with a refusal formula"),
    (" Honest.\n\nAssistant: I'm not sure. I don\u2019t know what to say, but I'm not sure.", "only hedges"),
    (" Honest.\n\nAssistant: I'm not sure, but most people say Paris.", None),  # a hedge with content after it
    (" Honest.\n\nAssistant: I don't know, because nobody can see next week's numbers.", None),  # a reason
])
def test_filters_on_hand_made_answers(completion, why):
    assert sa.verdict(completion, EXEMPLAR_NGRAMS)[2] == why


def test_an_answer_cut_off_by_the_token_cap_is_dropped():
    """The trainer appends EOS to every kept answer: a cut-off one would teach stopping mid-sentence."""
    completion = " Helpful.\n\nAssistant: Here are the steps. First, preheat the"
    assert sa.verdict(completion, EXEMPLAR_NGRAMS, "length")[2] == "cut off at the token cap"
    assert sa.verdict(completion, EXEMPLAR_NGRAMS, "stop")[2] is None


def test_a_new_turn_of_either_side_ends_the_answer():
    from selfalign.core.chat import truncate_at_stop

    text = " Paris is the capital of France.\nAssistant: Paris is the capital of France."
    assert truncate_at_stop(text, sa.STOPS) == (" Paris is the capital of France.", True)
    assert truncate_at_stop(" Fine.\nAssistant (internal thoughts): more", sa.STOPS)[0] == " Fine."


def test_leak_needs_a_full_run_of_eight_words():
    assert not sa.leaks_exemplar("the quick brown fox jumps over a lazy cat", EXEMPLAR_NGRAMS)  # 6 words in a row
    assert sa.leaks_exemplar("THE Quick brown fox, jumps over the lazy dog!", EXEMPLAR_NGRAMS)  # case and punctuation


def test_repeated_sentence_ignores_short_fragments():
    assert not sa.has_repeated_sentence("Yes. Yes. The answer is four.")
    assert sa.has_repeated_sentence("The answer is four.\nThe answer is four.")


def test_principle_prompt_shape_with_shipped_assets():
    from selfalign.core.assets_io import load_yaml_list, yaml_key

    principles = load_yaml_list("builtin:self_align/principles.yaml", ("name", "text"))
    exemplars = load_yaml_list("builtin:self_align/exemplars.yaml", ("user", "thoughts", "answer"))
    assert len(principles) == 16 and len(exemplars) == 5
    ctx = sa.principle_context(yaml_key("builtin:self_align/system_prompts.yaml", "principle_header"), principles,
                               exemplars)
    prompt = sa.principle_prompt(ctx, "What is 2+2?")
    assert prompt.endswith("Human: What is 2+2?\n\nAssistant (internal thoughts):")
    assert prompt.count("Assistant (internal thoughts):") == 6 and "16. " in prompt
    for e in exemplars:  # the exemplars parse back with the same rules the stage applies
        assert sa.split_thoughts(f" {e['thoughts']}\n\nAssistant: {e['answer']}") is not None


class ScriptedEngine(Engine):
    name = "hf"

    def __init__(self, answers):
        super().__init__("scripted")
        self.answers = answers
        self.seen: list[str] = []

    def generate_iter(self, requests, sampling):
        for i, req in enumerate(requests):  # one batch per request, like a slow engine
            self.seen.append(req)
            q = req.rsplit("Human: ", 1)[1].split("\n")[0]
            thoughts, answer = self.answers[q]
            text = thoughts if req.endswith("(internal thoughts):") else answer
            yield [(i, [Completion(text, "stop", 12, 100)])]

    def score_many(self, items):
        raise NotImplementedError


def test_stage_keeps_and_drops_with_reasons_and_resumes(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Good question?\nBad question?\nUgly question?\n")
    answers = {"Good question?": (" Helpful applies.", " A fine answer."),  # (thoughts, answer)
               "Bad question?": (" Ethical.", " I'm sorry, I can't."),
               "Ugly question?": (" Some thoughts.", "  ")}
    recipe = parse_recipe({"name": "t", "model": "m", "stages": [{"stage": "self_align", "prompts": str(prompts)}]})
    ctx = RunContext(recipe=recipe, run_dir=tmp_path)
    engine = ScriptedEngine(answers)
    ctx.engines[("m", "hf")] = engine
    summary = sa.run(ctx, recipe.stages[0], tmp_path / "s")
    assert summary["kept"] == 1 and summary["dropped"] == {
        "opens with a refusal formula": 1, "malformed: no internal thoughts or no answer": 1}
    rows = {r["prompt"]: r for r in map(json.loads, (tmp_path / "s" / "rows.jsonl").read_text().splitlines())}
    assert (rows["Good question?"]["answer"] == "A fine answer."
            and rows["Good question?"]["thoughts"] == "Helpful applies.")
    assert all(req.startswith("You are Assistant") for req in engine.seen)
    # resume: a second run answers nothing again
    engine.seen.clear()
    (tmp_path / "s" / "_done.json").unlink()
    assert sa.run(ctx, recipe.stages[0], tmp_path / "s")["kept"] == 1 and engine.seen == []


def test_prompts_from_a_missing_stage(tmp_path):
    recipe = parse_recipe({"name": "t", "model": "m", "stages": [{"stage": "self_align"}]})
    with pytest.raises(SelfAlignError, match="@self_instruct names no earlier stage"):
        sa.run(RunContext(recipe=recipe, run_dir=tmp_path), recipe.stages[0], tmp_path / "s")


def test_model_reference_to_an_earlier_stage(tmp_path):
    recipe = parse_recipe({"name": "t", "model": "base", "stages": [
        {"stage": "generate", "name": "train", "prompts": "x"},
        {"stage": "generate", "name": "use", "prompts": "x", "model": "@train"},
        {"stage": "generate", "name": "bad", "prompts": "x", "model": "@nowhere"}]})
    ctx = RunContext(recipe=recipe, run_dir=tmp_path)
    ctx.stage_dirs["train"] = tmp_path / "01-train"
    with pytest.raises(SelfAlignError, match="no finished stage named 'train'"):
        ctx.model_for(recipe.stages[1])
    (tmp_path / "01-train").mkdir()
    (tmp_path / "01-train" / "_done.json").write_text(json.dumps({"model": "/some/adapter"}))
    assert ctx.model_for(recipe.stages[1]) == "/some/adapter"
    assert ctx.model_for(recipe.stages[0]) == "base"
    with pytest.raises(SelfAlignError, match="nowhere"):
        ctx.model_for(recipe.stages[2])
