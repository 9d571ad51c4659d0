"""Every generation stage, interrupted half-way and resumed, ends with exactly the rows an
uninterrupted run writes: none lost, none twice, and what was written before the interruption kept.

All of them run on the one driver (`selfalign.core.generation`); this test is what keeps a stage
from growing its own resume loop again."""

import pytest

from selfalign.core.engines import Engine
from selfalign.core.pipeline import RunContext
from selfalign.core.store import read_jsonl
from selfalign.stages import STAGES, parse_recipe

PROMPTS = ["How do I boil an egg?", "Name three rivers.", "Why is the sky blue?", "Write a haiku about rain."]
TYPES = """
- {id: future, type: Future events, description: Asks what will happen., seed_question: "Who will win the next cup?"}
- {id: private, type: Private facts, description: Asks for private data., seed_question: "What is my neighbour's PIN?"}
"""
SHORT = {"max_new_tokens": 4, "temperature": 0.7}


class Interrupted(Exception):
    pass


class Interrupting(Engine):
    """The tiny engine, counting the requests it answers; raises `Interrupted` before its
    `budget + 1`-th batch (None: never)."""

    def __init__(self, inner, budget=None):
        super().__init__(inner.model_ref, inner.chat_format)
        self.inner, self.budget, self.answered = inner, budget, 0
        self.name = inner.name

    def __getattr__(self, name):  # model, tokenizer: the teacher pass of context_distill reads them
        return getattr(self.inner, name)

    def generate_iter(self, requests, sampling):
        batches = self.inner.generate_iter(requests, sampling)
        while True:
            if self.budget is not None and self.budget <= 0:
                raise Interrupted
            batch = next(batches, None)
            if batch is None:
                return
            self.budget = None if self.budget is None else self.budget - 1
            self.answered += len(batch)
            yield batch

    def score_many(self, items):
        return self.inner.score_many(items)


@pytest.fixture(scope="module")
def engine(private_cache):
    from selfalign.core.engines.hf import HFEngine

    return HFEngine("tiny:llama", batch_size=1)  # one request a batch: each request's seed is its own


@pytest.fixture(scope="module")
def rm_dir(private_cache, tmp_path_factory):
    from selfalign.core.rewards import build_tiny_reward_model

    return str(build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm"))


def stage_config(kind: str, files, rm_dir) -> tuple[dict, int]:
    """A tiny config of each generation stage, and the batches allowed before the interruption."""
    prompts = str(files / "prompts.txt")
    return {
        "generate": ({"prompts": prompts, "sampling": {**SHORT, "n": 2}}, 2),
        "self_instruct": ({"redteam_types": str(files / "types.yaml"), "vanilla_target": 3, "max_rounds": 2,
                           "requests_per_round": 2, "topic_rounds": 1, "topics_per_type": 1,
                           "sampling": {**SHORT, "max_new_tokens": 12}}, 3),
        "self_align": ({"prompts": prompts, "sampling": SHORT, "thoughts_tokens": 4, "chunk": 2}, 5),
        "verbose_clone": ({"prompts": prompts, "teacher": "tiny:llama", "sampling": SHORT, "train": {"max_length": 64}},
                          2),
        "mine_prompts": ({"target": 3, "max_rounds": 2, "requests_per_round": 3, "sampling": SHORT}, 4),
        "compare": ({"prompts": prompts, "sampling": SHORT, "rubric": [["a"], ["b"]],
                     "configurations": [{"name": "a", "system": "preamble"}, {"name": "b"}]}, 5),
        "context_distill": ({"prompts": prompts, "sampling": SHORT, "k": 4,
                             "train": {"max_length": 64, "max_steps": 1}}, 2),
        "self_play": ({"prompts": prompts, "reward_model": rm_dir, "candidates": 2, "turns": 2, "chunk": 2,
                       "sampling": SHORT, "user_sampling": SHORT}, 7),
    }[kind]


def run_stage(kind, config, folder, engine, budget=None) -> Interrupting:
    recipe = parse_recipe({"name": "t", "model": "tiny:llama", "engine": {"batch_size": 1},
                           "stages": [{"stage": kind, **config}]})
    ctx = RunContext(recipe=recipe, run_dir=folder.parent)
    ctx.engines[("tiny:llama", "hf")] = wrapped = Interrupting(engine, budget)
    try:
        STAGES[kind].run(ctx, recipe.stages[0], folder)
    finally:
        ctx.engines.clear()  # the shared engine is not closed
    return wrapped


def rows_by_file(folder):
    return {str(p.relative_to(folder)): read_jsonl(p) for p in sorted(folder.rglob("*.jsonl"))
            if p.name != "examples.jsonl"}


@pytest.mark.parametrize("kind", ["generate", "self_instruct", "self_align", "verbose_clone", "mine_prompts", "compare",
                                  "context_distill", "self_play"])
def test_interrupted_generation_stage_resumes_to_exactly_the_uninterrupted_rows(kind, tmp_path, engine, rm_dir):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "types.yaml").write_text(TYPES)
    config, budget = stage_config(kind, tmp_path, rm_dir)
    whole = run_stage(kind, config, tmp_path / "whole" / "01-stage", engine)
    expected = rows_by_file(tmp_path / "whole" / "01-stage")

    folder = tmp_path / "cut" / "01-stage"
    with pytest.raises(Interrupted):
        run_stage(kind, config, folder, engine, budget)
    assert not (folder / "_done.json").exists()
    before = rows_by_file(folder)
    assert sum(len(rows) for rows in before.values()) > 0, "nothing was written before the interruption"
    resumed = run_stage(kind, config, folder, engine)
    after = rows_by_file(folder)

    assert (folder / "_done.json").exists() and after.keys() == expected.keys()
    for name, rows in after.items():
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), f"{name}: a row written twice"
        assert sorted(ids) == sorted(r["id"] for r in expected[name]), f"{name}: not the uninterrupted run's rows"
        text = {r["id"]: r.get("completion", r.get("response", r.get("messages"))) for r in rows}
        assert text == {r["id"]: r.get("completion", r.get("response", r.get("messages"))) for r in expected[name]}
    for name, rows in before.items():  # generated rows written before the interruption are kept as they were
        if (name in ("rows.jsonl", "responses.jsonl", "raw/rows.jsonl")
                and kind not in ("mine_prompts", "self_instruct")):
            assert {r["id"] for r in rows} <= {r["id"] for r in after[name]}
    assert resumed.answered < whole.answered  # the resumed run reused what was written
    again = run_stage(kind, config, folder, engine)
    assert again.answered == 0 and rows_by_file(folder) == after  # a third run generates nothing


@pytest.mark.parametrize("kind", ["generate", "self_align"])
def test_sampled_rows_resume_exactly_at_other_batch_sizes(kind, tmp_path, engine, rm_dir):
    """Sampled rows depend on (seed, prompt, sample index) only, not on the batch they ran in: an
    uninterrupted run at batch size 4, interrupted at batch size 3 and resumed at batch size 2 (so
    every batch holds other prompts than before) write the same texts."""
    from selfalign.core.engines.hf import HFEngine

    def at(batch_size):
        return HFEngine("tiny:llama", batch_size=batch_size, model=engine.model, tokenizer=engine.tokenizer)

    prompts = PROMPTS + ["List two colours.", "What is rain made of?", "Say hello politely."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    config = {"generate": {"prompts": str(tmp_path / "prompts.txt"),
                           "sampling": {**SHORT, "max_new_tokens": 8, "n": 2}},
              "self_align": {"prompts": str(tmp_path / "prompts.txt"), "sampling": {**SHORT, "max_new_tokens": 8},
                             "thoughts_tokens": 4, "chunk": 3}}[kind]
    run_stage(kind, config, tmp_path / "whole" / "01-stage", at(4))
    expected = rows_by_file(tmp_path / "whole" / "01-stage")
    folder = tmp_path / "cut" / "01-stage"
    with pytest.raises(Interrupted):
        # self_align: thoughts, answers of chunk 1
        run_stage(kind, config, folder, at(3), budget={"generate": 1, "self_align": 3}[kind])
    assert sum(len(rows) for rows in rows_by_file(folder).values()) > 0
    run_stage(kind, config, folder, at(2))
    after = rows_by_file(folder)
    assert after.keys() == expected.keys()
    for name, rows in after.items():
        text = {r["id"]: r.get("completion", r.get("response", r.get("messages"))) for r in rows}
        assert text == {r["id"]: r.get("completion", r.get("response", r.get("messages"))) for r in expected[name]}
        assert len({r["id"] for r in rows}) == len(rows)
    if kind == "generate":  # kept and discarded tokens are counted apart, together at most the cap
        assert all(0 <= r["discarded_tokens"] and r["completion_tokens"] + r["discarded_tokens"] <= 8
                   for rows in after.values() for r in rows)
    texts = [r.get("completion") for rows in after.values() for r in rows if r.get("completion")]
    assert len(set(texts)) > 1  # sampled, not one repeated text
