"""The shared reward-model trainer (selfalign.core.reward_training, TRL RewardTrainer) and the `reward_model` stage."""

import json

import pytest
from test_evals import make_fixture

from selfalign.core.reward_training import (
    is_reward_model,
    reward_training,
    tokenize_pairs,
    train_reward_model,
)
from selfalign.core.rewards import RewardModel
from selfalign.methods.almost.reward_model import split_by_prompt

GOOD = ["Sure. Here is a short, careful answer to that.", "Happy to help. The steps are listed below.",
        "Good question. The answer depends on two things."]
BAD = ["zq xv zq xv", "no", "qqqq!!?? zzz"]


def pairs(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"question number {i + offset}?", "chosen": GOOD[i % 3], "rejected": BAD[(i + 1) % 3]}
            for i in range(n)]


def accuracy(rm, rows):
    c = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    r = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    return sum(x > y for x, y in zip(c, r, strict=True)) / len(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, private_cache):
    out = tmp_path_factory.mktemp("rm")
    settings = reward_training().model_copy(update={"lr": 1e-3, "epochs": 4, "batch_size": 4, "warmup_ratio": 0.0,
                                                    "max_length": 64})
    result = train_reward_model("tiny:llama", pairs(24), out, settings)
    return out, result


def test_full_training_learns_a_separable_preference(trained):
    out, result = trained
    assert result["started_from"] == "causal LM" and result["pairs"] == 24 and result["steps"] == 24
    assert (out / "trainer_state.json").exists() and is_reward_model(result["model"])
    assert result["last_loss"] < result["first_loss"]
    rm = RewardModel(result["model"], max_length=64)
    assert accuracy(rm, pairs(12, offset=100)) == 1.0  # unseen prompts, same kind of replies


def test_training_text_is_what_the_reward_model_reads(trained):
    _, result = trained
    rm = RewardModel(result["model"], max_length=16)
    rows = [{"prompt": [{"role": "user", "content": "a long question " * 5}], "chosen": "fine.", "rejected": "no"}]
    ids = tokenize_pairs(rm.tokenizer, rows, 16)[0]
    assert ids["chosen_ids"] == rm.encode(rows[0]["prompt"], "fine.")
    assert ids["rejected_ids"] == rm.encode(rows[0]["prompt"], "no")
    assert len(ids["chosen_ids"]) == 16 and ids["chosen_ids"][-1] == rm.tokenizer.eos_token_id


def test_continuing_from_a_reward_model_keeps_its_head(trained, tmp_path):
    """PMP then fine-tuning: a reward model as the base is trained further, not re-headed."""
    _, first = trained
    before = RewardModel(first["model"]).score(["q"], ["Sure. A reply."])[0]
    settings = reward_training().model_copy(update={"lr": 1e-12, "max_steps": 1, "warmup_ratio": 0.0})
    again = train_reward_model(first["model"], pairs(4), tmp_path, settings)
    assert again["started_from"] == "reward model"
    after = RewardModel(again["model"]).score(["q"], ["Sure. A reply."])[0]
    assert after == pytest.approx(before, abs=1e-4)


def test_lora_reward_model_saves_a_seq_cls_adapter(tmp_path, private_cache):
    settings = reward_training().model_copy(update={"lora": True, "r": 4, "alpha": 8, "lr": 5e-3, "epochs": 2,
                                                    "warmup_ratio": 0.0, "max_length": 64})
    result = train_reward_model("tiny:llama", pairs(8), tmp_path, settings)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and is_reward_model(result["model"])
    rm = RewardModel(result["model"])
    assert len(set(rm.score(["q", "q"], GOOD[:1] + BAD[:1]))) == 2


def test_split_by_prompt_holds_out_whole_prompts():
    rows = [{"prompt": f"p{i // 3}", "chosen": "a", "rejected": str(i)} for i in range(30)]
    train, held = split_by_prompt(rows, 0.2, seed=1)
    assert len(held) == 6 and len(train) == 24
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert split_by_prompt(rows, 0.2, seed=1) == (train, held)
    assert split_by_prompt(rows[:3], 0.5, seed=0)[1] == []  # one prompt: nothing to hold out


def test_reward_model_stage_and_judge_reference(tmp_path, private_cache):
    from selfalign.stages import parse_recipe, run_recipe

    data = tmp_path / "pairs.jsonl"
    rows = pairs(20) + [{"prompt": "dropped", "chosen": "x", "rejected": "y", "kept": False}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "rm", "model": "tiny:llama", "stages": [
        {"stage": "reward_model", "data": str(data), "train": {"lr": 1e-3, "epochs": 2, "max_length": 64},
         "heldout": 0.25},
        {"stage": "eval", "name": "rm_hhh", "evals": ["hhh"], "scoring": ["rm"], "judge": "@reward_model",
         "data_dir": str(make_fixture(tmp_path / "data"))}]}
    out = tmp_path / "run"
    run_recipe(parse_recipe(recipe, "rm.yaml"), out)
    done = json.loads((out / "01-reward_model" / "_done.json").read_text())
    assert done["train_pairs"] == 15 and done["heldout_pairs"] == 5 and done["skipped"] == 1
    results = json.loads((out / "01-reward_model" / "results.json").read_text())
    held = results["evals"]["heldout_pairs"]
    assert held["counts"]["pairs"] == 5 and len(held["rewards"]["chosen"]) == 5
    assert done["accuracy"]["heldout_pairs"] == pytest.approx(held["metrics"]["preference"]["accuracy"], abs=1e-4)
    hhh = json.loads((out / "02-rm_hhh" / "results.json").read_text())
    assert hhh["judge"] == done["model"] and "rm" in hhh["evals"]["hhh"]["metrics"]
