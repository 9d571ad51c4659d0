"""ALMoST's last three stages on tiny models: reward-model-guided self-play, SFT on its
conversations, and RLSF (RLOO against the reward model), alone and as one recipe."""

import json

import pytest

from selfalign.core.pipeline import RunContext
from selfalign.core.report import render_section
from selfalign.core.store import read_jsonl
from selfalign.methods.almost import rlsf, self_play, sft
from selfalign.methods.almost.rloo import kl_estimate, policy_prompt
from selfalign.stages import parse_recipe, run_recipe

PROMPTS = [f"Question {i}: how do I {verb} a {noun}?" for i, (verb, noun) in enumerate(
    [("clean", "kettle"), ("plant", "tree"), ("fix", "bike"), ("paint", "fence"), ("bake", "cake"),
     ("tune", "guitar"), ("wash", "car"), ("fold", "shirt"), ("boil", "egg"), ("sharpen", "knife")])]


@pytest.fixture(scope="module")
def rm_dir(private_cache, tmp_path_factory):
    from selfalign.core.rewards import build_tiny_reward_model

    return str(build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm"))


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def play_stage(prompts, rm, **extra) -> dict:
    return {"stage": "self_play", "prompts": str(prompts), "reward_model": rm, "candidates": 3, "turns": 2,
            "sampling": {"max_new_tokens": 12}, "user_sampling": {"max_new_tokens": 10}, "chunk": 2, **extra}


def context(tmp_path, *stages, **recipe) -> RunContext:
    parsed = parse_recipe({"name": "t", "model": "tiny:llama", "engine": {"batch_size": 8}, "stages": list(stages),
                           **recipe})
    return RunContext(recipe=parsed, run_dir=tmp_path)


# -- pure helpers -----------------------------------------------------------------------------------
def test_pick_best_takes_the_first_maximum_and_never_an_empty_reply():
    assert self_play.pick_best([0.1, 0.7, 0.7, -2.0]) == 1
    assert self_play.pick_best([None, -3.0, None]) == 1
    assert self_play.pick_best([None, None]) is None


def test_user_request_and_reply_cleaning():
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": " Hello. "}]
    req = self_play.user_request("Be curious.", msgs)
    assert req == "Be curious.\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman:"
    assert self_play.clean_reply(" Why is that?\n\nAssistant: because", self_play.USER_STOPS) == "Why is that?"
    assert self_play.clean_reply("  plain  ", ["\nHuman:"]) == "plain"


def test_turn_examples_cover_every_assistant_turn_with_the_dialogue_before_it():
    msgs = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a."},
            {"role": "user", "content": "B?"}, {"role": "assistant", "content": "b."}]
    ex = sft.turn_examples(msgs)
    assert (ex
            == [(1, "Human: A?\n\nAssistant:", " a."),
                (2, "Human: A?\n\nAssistant: a.\n\nHuman: B?\n\nAssistant:", " b.")])
    assert sft.turn_examples(msgs, "Sys.")[0][1] == "Sys.\n\nHuman: A?\n\nAssistant:" == policy_prompt(msgs[:1], "Sys.")


def test_heldout_split_is_seeded_and_disjoint():
    prompts = [(str(i), f"p{i}") for i in range(20)]
    train, held = rlsf.split_heldout(prompts, 5, seed=3)
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert rlsf.split_heldout(prompts, 5, seed=3) == (train, held) and rlsf.split_heldout(prompts, 5, seed=4)[1] != held
    assert kl_estimate([-1.0, -2.0], [-1.5, -3.5]) == pytest.approx(1.0)


# -- self_play --------------------------------------------------------------------------------------
def test_self_play_rows_keep_the_best_candidate_by_reward(tmp_path, prompt_file, rm_dir):
    from selfalign.core.rewards import RewardModel

    ctx = context(tmp_path, play_stage(prompt_file, rm_dir, max_prompts=4))
    summary = self_play.run(ctx, ctx.recipe.stages[0], tmp_path / "play")
    rows = read_jsonl(tmp_path / "play" / "rows.jsonl")
    assert len(rows) == 4 == summary["conversations"] and len({r["prompt_id"] for r in rows}) == 4
    rm = RewardModel(rm_dir)  # as the stage loads it: float32 on the CPU, bfloat16 on a GPU
    tol = 1e-4 if rm.device.type == "cpu" else 0.03  # bfloat16 keeps ~3 digits; another batch rounds differently
    two_turns = 0
    for row in rows:
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"] * (len(msgs) % 2)
        assert msgs[0]["content"] == row["prompt"] and row["assistant_turns"] == len(row["turns"]) <= 2
        assert row["meta"]["reward_model"] == rm_dir and row["meta"]["candidates"] == 3
        two_turns += len(row["turns"]) == 2
        for t, turn in enumerate(row["turns"]):
            assert len(turn["candidates"]) == 3
            scores = [c["score"] for c in turn["candidates"]]
            best = max(s for s in scores if s is not None)
            assert turn["chosen"] == scores.index(best) and turn["reward"] == best
            chosen = turn["candidates"][turn["chosen"]]["text"]
            reply_at = 2 * t + 1
            assert (msgs[reply_at] == {"role": "assistant", "content": chosen}
                    and msgs[reply_at - 1]["content"] == turn["user"])
            # the reward model scored the dialogue before the reply, without the assistant's system prompt
            assert rm.score([msgs[:reply_at]], [chosen])[0] == pytest.approx(best, abs=tol)
    assert two_turns >= 1, "no conversation reached a second assistant turn"
    assert summary["chosen_reward"] >= summary["candidate_reward"]


class Killed(Exception):
    pass


class Recording:
    """The tiny engine, recording every request; raises `Killed` on the `kill_at`-th generate call."""

    def __init__(self, engine, kill_at=None):
        self.engine, self.kill_at, self.calls, self.seen = engine, kill_at, 0, []

    def generate(self, requests, sampling):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed
        self.seen.extend(requests)
        return self.engine.generate(requests, sampling)


def test_self_play_killed_half_way_resumes_without_losing_or_repeating(tmp_path, prompt_file, rm_dir, tiny_engine):
    ctx = context(tmp_path, play_stage(prompt_file, rm_dir, max_prompts=6))
    config, folder = ctx.recipe.stages[0], tmp_path / "play"
    ctx.engines[("tiny:llama", "hf")] = first = Recording(tiny_engine, kill_at=5)  # in the second chunk of two
    with pytest.raises(Killed):
        self_play.run(ctx, config, folder)
    before = read_jsonl(folder / "rows.jsonl")
    assert len(before) == 2 and not (folder / "_done.json").exists()
    with open(folder / "rows.jsonl", "a") as f:  # the worst case: the kill landed in the middle of a write
        f.write('{"id": "half-writ')
    ctx.engines[("tiny:llama", "hf")] = second = Recording(tiny_engine)
    summary = self_play.run(ctx, config, folder)
    rows = read_jsonl(folder / "rows.jsonl")
    assert rows[:2] == before and len(rows) == 6 == summary["conversations"]
    wanted = {p for _, p in ctx.stage_prompts(config)}
    assert len({r["id"] for r in rows}) == 6 and {r["prompt"] for r in rows} == wanted
    finished = {r["prompt"] for r in before}
    assert not any(p in req for req in second.seen for p in finished), "a finished conversation was played again"
    assert {p for p in PROMPTS if any(f"Human: {p}\n" in req for req in second.seen)} == wanted - finished
    assert first.calls >= 5


# -- sft --------------------------------------------------------------------------------------------
def test_sft_trains_on_assistant_turns_only(tmp_path, private_cache, monkeypatch):
    import trl

    from selfalign.core.models import load_tokenizer, resolve
    from selfalign.core.training import IGNORE

    conv = [{"role": "user", "content": "How do I boil an egg?"},
            {"role": "assistant", "content": "Put it in boiling water."},
            {"role": "user", "content": "For how long?"}, {"role": "assistant", "content": "About nine minutes."}]
    data = tmp_path / "play.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "c1", "messages": conv, "kept": True},
        {"id": "c2", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
        {"id": "c3", "messages": [{"role": "user", "content": "Dropped"}], "kept": False}]))
    seen = {}

    class Capturing(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["dataset"] = self.train_dataset

    monkeypatch.setattr(trl, "SFTTrainer", Capturing)
    ctx = context(tmp_path, {"stage": "sft", "data": str(data), "train": {"epochs": 1, "max_length": 256}})
    summary = sft.run(ctx, ctx.recipe.stages[0], tmp_path / "sft")
    examples = read_jsonl(tmp_path / "sft" / "examples.jsonl")
    assert [(e["conversation_id"], e["turn"]) for e in examples] == [("c1", 1), ("c1", 2), ("c2", 1)]
    assert summary["skipped"] == {"not kept": 1, "no assistant turn": 0} and summary["lora"] == "full"
    assert summary["model"].endswith("model")
    tok = load_tokenizer(resolve("tiny:llama"))
    trained = list(seen["dataset"])
    assert len(trained) == 3
    replies = ["Put it in boiling water.", "About nine minutes.", "Hello there."]
    for row, e, reply in zip(trained, examples, replies, strict=True):
        labelled = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE]
        assert tok.decode(labelled) == f" {reply}<eos>"  # the reply and its EOS, nothing of the human's turns
        assert e["prompt"].endswith("Assistant:") and e["completion"] == f" {reply}"
    assert "For how long?" in examples[1]["prompt"] and "About nine" not in examples[1]["prompt"]


# -- rlsf -------------------------------------------------------------------------------------------
def rlsf_stage(prompts, rm, **train) -> dict:
    return {"stage": "rlsf", "model": "tiny:llama", "prompts": str(prompts), "reward_model": rm, "heldout": 3,
            "max_completion_length": 8, "train": {"max_steps": 2, "lr": 5e-3, **train}}


def test_rlsf_logs_reward_and_kl_and_writes_heldout_numbers(tmp_path, prompt_file, rm_dir, monkeypatch):
    trained_on = []

    class Spying(rlsf.RewardFunction):
        def __call__(self, prompts, completions, dialogue=None, **kwargs):
            trained_on.extend(json.loads(d)[0]["content"] for d in dialogue)
            return super().__call__(prompts, completions, dialogue=dialogue, **kwargs)

    monkeypatch.setattr(rlsf, "RewardFunction", Spying)
    ctx = context(tmp_path, rlsf_stage(prompt_file, rm_dir))
    summary = rlsf.run(ctx, ctx.recipe.stages[0], tmp_path / "rl")
    folder = tmp_path / "rl"
    log = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in log if "reward" in e]
    assert len(steps) == 2 and all("kl" in e and "completions/mean_length" in e for e in steps)
    split = {r["prompt"]: r["split"] for r in read_jsonl(folder / "prompts.jsonl")}
    held = {p for p, s in split.items() if s == "heldout"}
    assert len(held) == 3 and len(split) == len(PROMPTS)
    assert trained_on and not held & set(trained_on), "a held-out prompt was trained on"
    res = json.loads((folder / "heldout.json").read_text())
    for name in ("sft", "rlsf"):
        assert len(res[name]["rewards"]) == 3 and res[name]["reward_mean"] == pytest.approx(
            sum(res[name]["rewards"]) / 3, abs=1e-3)
    rows = read_jsonl(folder / "rows.jsonl")
    assert sorted(r["policy"] for r in rows) == ["rlsf"] * 3 + ["sft"] * 3 and {r["prompt"] for r in rows} == held
    kl = sum(r["logp_rlsf"] - r["logp_sft"] for r in rows if r["policy"] == "rlsf") / 3
    assert res["kl_rlsf_sft"] == pytest.approx(kl, abs=1e-3) == summary["heldout_kl_rlsf_sft"]
    assert any(abs(r["logp_rlsf"] - r["logp_sft"]) > 1e-4 for r in rows
               if r["policy"] == "rlsf"), "the policy did not move"
    assert summary["heldout_reward_gain"] == res["reward_gain"] and summary["steps"] == 2
    assert (folder / "adapter" / "adapter_config.json").exists()
    anchor, title, html = render_section(rlsf.report_section({"label": "rlsf", "folder": folder}))
    assert "held-out" in title and "<img" in html and "RLSF" in html


def test_rlsf_with_a_vanishing_step_keeps_the_sft_policy(tmp_path, prompt_file, rm_dir, monkeypatch):
    """With a learning rate of ~0 the adapter stays zero: both policies sample the same replies, the
    KL estimate is 0 and the rewards agree, which checks the held-out comparison itself. Then a rerun
    killed after training resumes the evaluation without training again."""
    ctx = context(tmp_path, rlsf_stage(prompt_file, rm_dir, lr=1e-20, max_steps=1))
    summary = rlsf.run(ctx, ctx.recipe.stages[0], tmp_path / "rl")
    res = json.loads((tmp_path / "rl" / "heldout.json").read_text())
    replies = {}
    for r in read_jsonl(tmp_path / "rl" / "rows.jsonl"):
        replies.setdefault(r["prompt"], {})[r["policy"]] = r["completion"]
    assert len(replies) == 3 and all(x["sft"] == x["rlsf"] for x in replies.values())
    assert res["sft"]["rewards"] == pytest.approx(res["rlsf"]["rewards"], abs=1e-4)
    assert summary["heldout_kl_rlsf_sft"] == pytest.approx(0.0, abs=1e-3)
    # killed after training, during the held-out evaluation: the rerun reuses the trained policy
    folder = tmp_path / "rl"
    (folder / "_done.json").unlink()
    kept = [r for r in read_jsonl(folder / "rows.jsonl") if r["policy"] == "sft"]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    monkeypatch.setattr(rlsf, "rloo_train", lambda *a, **k: pytest.fail("trained again"))
    again = rlsf.run(ctx, ctx.recipe.stages[0], folder)
    assert (again["heldout_reward_rlsf"] == summary["heldout_reward_rlsf"]
            and len(read_jsonl(folder / "rows.jsonl")) == 6)


# -- the three as one recipe --------------------------------------------------------------------------
def test_self_play_sft_rlsf_recipe_end_to_end(tmp_path, prompt_file, rm_dir):
    from selfalign.stages import build_report

    recipe = parse_recipe({"name": "almost-tail", "model": "tiny:llama", "engine": {"batch_size": 8}, "stages": [
        play_stage(prompt_file, rm_dir, max_prompts=4, turns=1),
        {"stage": "sft", "train": {"epochs": 1, "max_length": 128}},
        {"stage": "rlsf", "prompts": str(prompt_file), "reward_model": rm_dir, "heldout": 2,
         "max_completion_length": 6, "train": {"max_steps": 1, "lora": False}}]})
    record = run_recipe(recipe, tmp_path / "run")
    stages = record["stages"]
    assert stages["self_play"]["summary"]["conversations"] == 4
    assert stages["sft"]["summary"]["examples"] == stages["self_play"]["summary"]["assistant_turns"]
    assert stages["rlsf"]["summary"]["policy"] == stages["sft"]["summary"]["model"]  # model: "@sft"
    assert stages["rlsf"]["summary"]["model"].endswith("model")  # lora: false saves all weights
    html = build_report(tmp_path / "run").read_text()
    assert "reward-model-guided self-play" in html and "held-out reward, SFT vs RLSF" in html
