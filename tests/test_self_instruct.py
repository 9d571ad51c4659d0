import json
import random

import pytest

from selfalign.core.engines.base import Completion, Engine
from selfalign.core.errors import SelfAlignError
from selfalign.core.pipeline import RunContext
from selfalign.methods.self_align import self_instruct as si
from selfalign.stages import parse_recipe


def test_parse_list_continuation():
    text = (" Write a haiku about rain.\n7. Explain recursion to a child.\n8) List three uses of vinegar\n\n"
            "Unrelated tail\n9.")
    assert si.parse_list_continuation(text) == [
        "Write a haiku about rain.", "Explain recursion to a child.", "List three uses of vinegar"]


@pytest.mark.parametrize("text, why", [
    ("Hi", "too short"),
    ("Describe the picture above in detail", "needs something a text model cannot see or make"),
    ("3 ways to cook rice please", "does not start with a letter"),
    ("Answer this. Human: what is love", "contains a role marker"),
    ("Explain how tides work in simple words", None),
])
def test_instruction_filters(text, why):
    assert si.instruction_ok(text, 3, 150) == why


WORDS = ["otters", "violins", "glaciers", "tractors", "comets", "bakers", "lanterns", "parrots", "canals", "meteors",
         "tulips", "robots", "pirates", "volcanoes", "kettles", "wizards", "harbors", "beetles", "mirrors", "dragons"]


class ScriptedEngine(Engine):
    """Answers each kind of self-instruct prompt with canned text, numbering what it writes."""

    name = "hf"

    def __init__(self):
        super().__init__("scripted")
        self.calls = 0
        self.prompts: list[str] = []
        self.passes: list[list[str]] = []  # the prompts of each generate_iter call

    def generate_iter(self, requests, sampling):
        self.passes.append(list(requests))
        out = []
        for i, prompt in enumerate(requests):
            self.calls += 1
            self.prompts.append(prompt)
            rng = random.Random(self.calls)
            a, b = rng.sample(WORDS, 2)
            one, two = (" ".join(rng.sample(WORDS, 6)) for _ in range(2))
            if prompt.startswith("Here is a varied list"):
                # two new tasks, one repeated (a ROUGE-L duplicate), one a text model cannot do
                text = f" Rank {one}.\n7. Sort {two}.\n8. Rank {one}.\n9. Draw a picture of a cat"
            elif "topics" in prompt:
                text = f" {a} tomorrow\n2. Stock prices\n3. Stock prices\n4. The {b}"
            else:
                text = f" Will {one} happen?\nExtra line"
            out.append((i, [Completion(text, "stop", 10, 5)]))
        yield out

    def score_many(self, items):
        raise NotImplementedError


def make_ctx(tmp_path, **stage):
    recipe = parse_recipe({"name": "t", "model": "scripted", "stages": [{"stage": "self_instruct", **stage}]})
    ctx = RunContext(recipe=recipe, run_dir=tmp_path)
    engine = ScriptedEngine()
    ctx.engines[("scripted", "hf")] = engine
    return ctx, recipe.stages[0], engine


def test_stage_keeps_filtered_deduplicated_prompts_and_resumes(tmp_path):
    ctx, config, engine = make_ctx(tmp_path, vanilla_target=6, max_rounds=3, requests_per_round=2, topic_rounds=1,
                                   topics_per_type=2)
    summary = si.run(ctx, config, tmp_path / "01-self_instruct")
    rows = [json.loads(x) for x in (tmp_path / "01-self_instruct" / "rows.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) == len(set(prompts))
    vanilla = [r for r in rows if r["source"] == "self_instruct"]
    assert len(vanilla) == summary["self_instruct"] == 6
    assert not any("picture" in p.lower() for p in prompts)  # filtered
    assert summary["dropped"]["needs something a text model cannot see or make"] >= 1
    tgrt = [r for r in rows if r["source"] == "tgrt"]
    assert tgrt and all(r["type"] and r["topic"] and "\n" not in r["prompt"] for r in tgrt)
    assert {r["topic"] for r in tgrt} >= {"Stock prices"}  # exact-match topic dedup kept it once per type
    # in-context examples come from the seeds (and later from kept instructions), 5 per request
    first = engine.prompts[0]
    assert first.count("\n") >= 6 and first.rstrip().endswith("6.")
    # a rerun over the same folder generates nothing new
    calls = engine.calls
    (tmp_path / "01-self_instruct" / "_done.json").unlink()
    (tmp_path / "01-self_instruct" / "rows.jsonl").unlink()
    again = si.run(ctx, config, tmp_path / "01-self_instruct")
    assert engine.calls == calls and again["prompts"] == summary["prompts"]


def kind(prompt: str) -> str:
    return "instruct" if prompt.startswith("Here is a varied list") else "topics" if "topics" in prompt else "question"


def test_red_team_requests_ride_in_the_vanilla_rounds_batches(tmp_path):
    """Two vanilla rounds make two decoding passes: the topic requests go with round 1, the
    questions (written from those topics) with round 2; with no vanilla round they go alone."""
    ctx, config, engine = make_ctx(tmp_path, vanilla_target=6, max_rounds=3, requests_per_round=2, topic_rounds=1,
                                   topics_per_type=2)
    summary = si.run(ctx, config, tmp_path / "a")
    assert [sorted({kind(p) for p in batch}) for batch in engine.passes] == [
        ["instruct", "topics"], ["instruct", "question"]]
    assert summary["tgrt"] > 0 and summary["self_instruct"] == 6
    ctx, config, engine = make_ctx(tmp_path, vanilla_target=0, topic_rounds=1, topics_per_type=2)
    alone = si.run(ctx, config, tmp_path / "b")
    assert [sorted({kind(p) for p in batch}) for batch in engine.passes] == [["topics"], ["question"]]
    assert alone["tgrt"] == summary["tgrt"]


def test_bad_asset_file_names_file_and_entry(tmp_path):
    bad = tmp_path / "types.yaml"
    bad.write_text("- id: x\n  type: T\n  description: d\n")
    ctx, config, _ = make_ctx(tmp_path, redteam_types=str(bad), vanilla_target=0)
    with pytest.raises(SelfAlignError, match=r"types.yaml: entry 0: missing seed_question"):
        si.run(ctx, config, tmp_path / "s")


def test_rerun_with_another_model_does_not_reuse_the_first_models_completions(tmp_path):
    """The ids of raw completions include the model and the sampling: a second model over the same
    folder generates its own instructions (it once silently reused the first model's)."""
    ctx, config, first = make_ctx(tmp_path, vanilla_target=2, max_rounds=1, requests_per_round=2, topic_rounds=1,
                                  topics_per_type=1)
    folder = tmp_path / "01-self_instruct"
    si.run(ctx, config, folder)
    assert first.calls
    other = ScriptedEngine()
    ctx.engines[("other", "hf")] = other
    (folder / "_done.json").unlink()
    si.run(ctx, config.model_copy(update={"model": "other"}), folder)
    assert other.calls == first.calls  # every request made again, by the other model
    hotter = ScriptedEngine()
    ctx.engines[("other", "hf")] = hotter
    si.run(ctx, config.model_copy(update={"model": "other", "sampling": config.sampling.model_copy(
        update={"temperature": 0.5})}), folder)
    assert hotter.calls == first.calls  # and again for other sampling
    raw = [json.loads(x) for x in (folder / "raw" / "rows.jsonl").read_text().splitlines()]
    assert {r["meta"]["model"] for r in raw} == {"scripted", "other"}
