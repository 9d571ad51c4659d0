import json

import pytest

from selfalign.core.engines.base import Sampling
from selfalign.core.errors import SelfAlignError
from selfalign.core.rewards import RewardModel, build_tiny_reward_model, reward_text, truncate_left
from selfalign.evals.preference import load_comparisons, preference_accuracy
from selfalign.evals.winrate import (
    JUDGE_ANSWER_PREFIX,
    LLMJudge,
    RewardJudge,
    generate_pair,
    judge_both_orders,
    run_winrate,
    win_rate,
    winrate_eval,
)

PROMPTS = ["Hi there", "What is the capital of France?", "Tell me a joke about cats, please.", "2+2?", "Why?"]
REPLIES = ["Hello! How can I help?", "Paris.", "No.", "4", "Because the sky is blue and the grass is green."]


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def rm(rm_folder):
    return RewardModel(str(rm_folder), batch_size=3)


# -- reward model ------------------------------------------------------------------------------
def test_reward_text_hand_cases():
    assert reward_text("Hi there", "  Hello! ", "<eos>") == "Human: Hi there\n\nAssistant: Hello!<eos>"
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert reward_text(chat, "Yo", None) == "Be kind.\n\nHuman: Hi\n\nAssistant: Yo"


def test_truncate_left_keeps_the_end_and_the_bos():
    assert truncate_left([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert truncate_left([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert truncate_left([1, 5, 6], 3, bos_id=1) == [1, 5, 6]


def test_reward_model_truncates_from_the_left(rm_folder):
    short = RewardModel(str(rm_folder), max_length=32)
    ids = short.encode("x" * 100 + " What is it?", "A cat.")
    assert len(ids) == 32 and ids[0] == short.tokenizer.bos_token_id
    assert short.tokenizer.decode(ids[1:]).endswith("What is it?\n\nAssistant: A cat.<eos>")
    # only the end is read: prompts that differ in their beginning score the same
    a, b = short.score(["x" * 100 + " What is it?", "y" * 100 + " What is it?"], ["A cat.", "A cat."])
    assert a == pytest.approx(b, abs=1e-6)


def test_reward_scores_deterministic_and_batch_invariant(rm, rm_folder):
    batched = rm.score(PROMPTS, REPLIES)
    assert len(batched) == len(PROMPTS) and len(set(batched)) == len(batched)
    assert rm.score(PROMPTS, REPLIES) == batched
    assert RewardModel(str(rm_folder), batch_size=8).score(PROMPTS, REPLIES) == pytest.approx(batched, abs=1e-4)
    one_by_one = [rm.score([p], [r])[0] for p, r in zip(PROMPTS, REPLIES, strict=True)]
    assert one_by_one == pytest.approx(batched, abs=1e-4)


def test_reward_model_from_peft_adapter(rm, rm_folder, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(rm_folder, num_labels=1)
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg).eval()
    expected = RewardModel("in-memory", model=peft_model, tokenizer=rm.tokenizer).score(PROMPTS, REPLIES)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = RewardModel(str(tmp_path / "adapter")).score(PROMPTS, REPLIES)
    assert loaded == pytest.approx(expected, abs=1e-5)
    assert loaded != pytest.approx(rm.score(PROMPTS, REPLIES), abs=1e-3)  # the adapter is applied


def test_not_a_reward_model(tmp_path):
    with pytest.raises(SelfAlignError, match="not a reward model"):
        RewardModel("tiny:llama")
    from peft import LoraConfig, get_peft_model

    from selfalign.core.models import load_model

    causal, _ = load_model("tiny:llama")
    get_peft_model(causal,
                   LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": "tiny:llama"}))
    with pytest.raises(SelfAlignError, match="not a reward model"):
        RewardModel(str(tmp_path / "a"))


# -- preference accuracy -------------------------------------------------------------------------
class FakeRM:
    """Reward = the number written as the response."""

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return [float(r) for r in responses]


def test_preference_accuracy_exact():
    rows = [
        {"prompt": "p", "chosen": "2", "rejected": "1"},  # right
        {"prompt": "p", "chosen": "0", "rejected": "1"},  # wrong
        {"prompt": "p", "chosen": "1", "rejected": "1"},  # tie: half
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "3", "rejected": "0"},  # right
    ]
    res = preference_accuracy(FakeRM(), rows)
    assert res["eval"] == "preference" and res["counts"] == {"pairs": 4}
    assert res["metrics"]["preference"] == {"accuracy": 0.625, "mean_margin": 0.75, "ties": 1}
    assert res["rewards"] == {"chosen": [2.0, 0.0, 1.0, 3.0], "rejected": [1.0, 1.0, 1.0, 0.0]}
    with pytest.raises(SelfAlignError, match="no comparison pairs"):
        preference_accuracy(FakeRM(), [])


def test_preference_accuracy_with_tiny_reward_model(rm):
    rows = [{"prompt": p, "chosen": r, "rejected": "no"} for p, r in zip(PROMPTS, REPLIES, strict=True)]
    res = preference_accuracy(rm, rows)
    assert 0.0 <= res["metrics"]["preference"]["accuracy"] <= 1.0 and len(res["rewards"]["chosen"]) == 5


def test_load_comparisons(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n\n")
    assert load_comparisons(good) == [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    cases = {
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n':
            r"bad.jsonl:2: missing field 'rejected'",
        '{"prompt": "p", "chosen": "a", "rejected": 3}\n': r"bad.jsonl:1: 'rejected' must be a string",
        '{"prompt": "p", \n': r"bad.jsonl:1: broken JSON",
        '[1, 2]\n': r"bad.jsonl:1: a row must be a JSON object",
        "\n\n": r"holds no comparison rows",
    }
    bad = tmp_path / "bad.jsonl"
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(SelfAlignError, match=message):
            load_comparisons(bad)
    with pytest.raises(SelfAlignError, match="does not exist"):
        load_comparisons(tmp_path / "missing.jsonl")


# -- win rate ------------------------------------------------------------------------------------
def test_win_rate_math():
    res = win_rate(["win"] * 6 + ["tie"] * 2 + ["loss"] * 2)
    assert (res["wins"], res["ties"], res["losses"], res["n"]) == (6, 2, 2, 10)
    assert res["win_rate"] == pytest.approx(0.7)
    assert 0.0 <= res["ci95_low"] < 0.7 < res["ci95_high"] <= 1.0
    assert res["ci95_low"] == pytest.approx(0.3968, abs=1e-3) and res["ci95_high"] == pytest.approx(0.8922, abs=1e-3)
    assert win_rate(["win"] * 3)["ci95_high"] == 1.0
    assert win_rate([])["win_rate"] is None
    with pytest.raises(ValueError):
        win_rate(["draw"])


class TableJudge:
    """Prefers position 1 always, or follows `prefer[(first, second)]` (1, 2 or 0)."""

    name = "table"

    def __init__(self, prefer=None):
        self.prefer = prefer

    def judge_many(self, items):
        return [{"preferred": 1 if self.prefer is None else self.prefer[(a, b)], "scores": [0.0, 0.0]}
                for _, a, b in items]


def test_position_bias_cancels():
    res = winrate_eval(TableJudge(), PROMPTS, REPLIES, ["other"] * 5)
    assert [r["outcome"] for r in res["rows"]] == ["tie"] * 5
    m = res["metrics"]
    assert m["winrate"]["ties"] == 5 and m["winrate"]["win_rate"] == 0.5
    assert m["winrate_a_first"]["wins"] == 5 and m["winrate_b_first"]["losses"] == 5
    assert m["position_bias"] == {"first_preferred": 1.0, "second_preferred": 0.0, "tied": 0.0}
    assert res["eval"] == "winrate" and res["counts"] == {"prompts": 5, "judgements": 10}


@pytest.mark.parametrize(
    "a_first, b_first, outcome",
    [(1, 2, "win"), (1, 0, "win"), (0, 2, "win"), (1, 1, "tie"), (0, 0, "tie"), (2, 2, "tie"),
     (2, 1, "loss"), (2, 0, "loss"), (0, 1, "loss")],
)
def test_both_order_outcomes(a_first, b_first, outcome):
    judge = TableJudge({("A", "B"): a_first, ("B", "A"): b_first})
    (row,) = judge_both_orders(judge, ["p"], ["A"], ["B"])
    assert row["outcome"] == outcome
    assert set(row["judgements"]) == {"a_first", "b_first"}


def test_reward_judge(rm):
    res = winrate_eval(RewardJudge(rm), PROMPTS, REPLIES, ["no"] * 5)
    rewards_a = rm.score(PROMPTS, REPLIES)
    rewards_b = rm.score(PROMPTS, ["no"] * 5)
    expected = ["win" if a > b else "loss" if a < b else "tie" for a, b in zip(rewards_a, rewards_b, strict=True)]
    assert [r["outcome"] for r in res["rows"]] == expected
    assert res["rows"][0]["judgements"]["a_first"]["scores"] == pytest.approx([rewards_a[0], rewards_b[0]])


def test_llm_judge_on_tiny_engine(tiny_engine):
    judge = LLMJudge(tiny_engine, system="You are a fair judge.")
    ctx = judge.context("Hi", "Hello!", "Go away.")
    assert ctx.startswith("You are a fair judge.\n\nHuman: ") and ctx.endswith("Assistant:" + JUDGE_ANSWER_PREFIX)
    assert "Response 1: Hello!" in ctx and "Response 2: Go away." in ctx
    res = winrate_eval(judge, PROMPTS[:2], REPLIES[:2], ["Go away.", "I don't know."], names=("a", "b"))
    for row in res["rows"]:
        for j in row["judgements"].values():
            assert j["preferred"] in (0, 1, 2) and all(s < 0 for s in j["scores"])
    assert res["metrics"]["winrate"]["n"] == 2 and res["judge"] == "llm"
    json.dumps(res)  # the result is plain JSON


def test_generate_pair_and_run_winrate(tiny_engine, tiny_gemma_engine, rm):
    sampling = Sampling(temperature=0, max_new_tokens=6)
    a, b = generate_pair(tiny_engine, tiny_gemma_engine, PROMPTS[:3], sampling)
    assert len(a) == len(b) == 3 and all(isinstance(x, str) for x in a + b)
    assert generate_pair(tiny_engine, tiny_gemma_engine, PROMPTS[:3], sampling) == (a, b)  # greedy
    res = run_winrate(tiny_engine, tiny_gemma_engine, RewardJudge(rm), PROMPTS[:3], sampling)
    assert res["models"] == {"a": "tiny:llama", "b": "tiny:gemma3"}
    assert [r["reply_a"] for r in res["rows"]] == a
    # a reward judge cannot depend on position: both orders agree
    for row in res["rows"]:
        assert row["judgements"]["a_first"]["result"] == row["judgements"]["b_first"]["result"] == row["outcome"]


def test_winrate_stage_compares_two_stages_answers_with_a_reward_model(tmp_path, private_cache):
    from selfalign.core.pipeline import RunContext
    from selfalign.core.recipe import check_references
    from selfalign.core.rewards import build_tiny_reward_model
    from selfalign.evals import winrate
    from selfalign.stages import parse_recipe

    rm = str(build_tiny_reward_model(tmp_path / "rm"))
    recipe = parse_recipe({"name": "t", "model": "tiny:llama", "stages": [
        {"stage": "generate", "name": "one", "prompts": "x"}, {"stage": "generate", "name": "two", "prompts": "x"},
        {"stage": "winrate", "a": "@one", "b": "@two", "judge": rm},
        {"stage": "winrate", "name": "same", "a": "@one", "b": "@one", "judge": rm}]})
    check_references(recipe)
    dirs = {}
    for label, replies in (("one", ["Paris.", "Four.", "Blue.", "x"]), ("two", ["Lyon.", "Five.", "Green."])):
        dirs[label] = tmp_path / label
        dirs[label].mkdir()
        rows = [{"id": f"{label}{i}", "prompt": f"Question {i}?", "sample": 0, "completion": r}
                for i, r in enumerate(replies)]
        rows.append({"id": f"{label}-extra", "prompt": "Question 0?", "sample": 1, "completion": "ignored"})
        (dirs[label] / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = RunContext(recipe=recipe, run_dir=tmp_path, stage_dirs=dirs)
    summary = winrate.run(ctx, recipe.stages[2], tmp_path / "03-winrate")
    assert summary["prompts"] == 3 and summary["wins"] + summary["ties"] + summary["losses"] == 3  # common prompts only
    results = json.loads((tmp_path / "03-winrate" / "results.json").read_text())
    assert results["evals"]["winrate"]["models"] == {"a": "@one", "b": "@two"}
    assert (tmp_path / "03-winrate" / "_done.json").exists()
    same = winrate.run(ctx, recipe.stages[3], tmp_path / "04-same")
    assert same["ties"] == 4 and same["winrate.win_rate"] == 0.5  # a stage against itself: every pair a tie
