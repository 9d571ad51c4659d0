"""The `train:` block: one settings value per training stage, handed whole to the one trainer skeleton.

The golden table below is what each stage's trainer was given before the settings moved into one
block (flat keys at the stage's top level, five hand-written trainer setups): captured from that code
by stopping each trainer at `Trainer.__init__` and reading its `TrainingArguments`. The same stages,
written with `train:`, must produce the same arguments.
"""

from __future__ import annotations

import json
import sys

import pytest

from selfalign.core import training
from selfalign.core.errors import SelfAlignError
from selfalign.core.training import tokenize_examples
from selfalign.stages import parse_recipe, run_recipe

PEFT_CAUSAL = (16, 16, 0.05, "CAUSAL_LM")
PEFT_SEQ_CLS = (16, 16, 0.05, "SEQ_CLS")
SFT = dict(warmup_steps=0.03, lr_scheduler_type="linear", weight_decay=0.0, max_steps=-1, gradient_accumulation_steps=1,
           per_device_train_batch_size=4, num_train_epochs=1.0)
RM = dict(warmup_steps=0.03, lr_scheduler_type="cosine", weight_decay=0.1, max_steps=-1, gradient_accumulation_steps=1,
          per_device_train_batch_size=4, num_train_epochs=1.0, learning_rate=2e-5)

# Every SFT stage goes through `sft_train`, which cuts examples to the recipe's max_length itself and
# hands TRL padding-free batches (TRL refuses a max_length beside padding_free).
def PACKED(max_length: int) -> dict:
    """TRL's side of an SFT stage, and the length selfalign cuts its examples to."""
    return dict(max_length=None, padding_free=True, cut_to=max_length)

# case: (stage as a recipe writes it now, the arguments the old code built for the same stage; SFT
# stages since padding-free batches: PACKED(the max_length the old code passed))
GOLDEN = {
    "engrave": ({"stage": "engrave", "data": "{answers}"},
                {"class": "SFTConfig", **SFT, "learning_rate": 4e-4, **PACKED(512), "lora": PEFT_CAUSAL}),
    "engrave_custom": ({"stage": "engrave", "data": "{answers}", "train": {"lr": 1e-4, "epochs": 2, "batch_size": 2,
                                                                         "grad_accum": 2, "warmup_ratio": 0.1,
                                                                         "lora": False}},
                       {"class": "SFTConfig", **SFT, "learning_rate": 1e-4, "num_train_epochs": 2.0,
                        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "warmup_steps": 0.1,
                        **PACKED(512), "lora": None}),
    "sft": ({"stage": "sft", "data": "{convs}"},
            {"class": "SFTConfig", **SFT, "learning_rate": 2e-5, "num_train_epochs": 3.0, **PACKED(512),
             "lora": None}),
    "sft_custom": ({"stage": "sft", "data": "{convs}", "train": {"lora": True, "lr": 2e-4, "max_length": 384,
                                                                 "scheduler": "cosine"}},
                   {"class": "SFTConfig", **SFT, "learning_rate": 2e-4, "num_train_epochs": 3.0, **PACKED(384),
                    "lr_scheduler_type": "cosine", "lora": PEFT_CAUSAL}),
    "verbose_clone": ({"stage": "verbose_clone", "teacher": "tiny:llama", "prompts": "{prompts}",
                       "sampling": {"max_new_tokens": 8}},
                      {"class": "SFTConfig", **SFT, "learning_rate": 4e-4, **PACKED(768), "lora": PEFT_CAUSAL}),
    "context_distill": ({"stage": "context_distill", "prompts": "{prompts}", "sampling": {"max_new_tokens": 8}, "k": 4,
                         "train": {"lr": 1e-4, "max_length": 256, "max_steps": 3, "grad_accum": 2}},
                        {"class": "TrainingArguments", **SFT, "learning_rate": 1e-4, "max_steps": 3,
                         "gradient_accumulation_steps": 2, "lora": PEFT_CAUSAL}),
    "reward_model": ({"stage": "reward_model", "data": "{pairs}"},
                     {"class": "RewardConfig", **RM, "max_length": None, "lora": None}),
    "reward_model_custom": ({"stage": "reward_model", "data": "{pairs}",
                             "train": {"batch_size": 8, "grad_accum": 16, "lora": True, "max_steps": 5}},
                            {"class": "RewardConfig", **RM, "per_device_train_batch_size": 8,
                             "gradient_accumulation_steps": 16, "max_steps": 5, "max_length": None,
                             "lora": PEFT_SEQ_CLS}),
    "pmp": ({"stage": "pmp", "corpus": "{pairs}", "format": "pairs"},
            {"class": "RewardConfig", **RM, "max_length": None, "lora": None}),
    **{f"pm_{objective}": ({"stage": "pm_scaling", "data": "{pairs}", "heldout": 0.25, "sizes": [4],
                            "objectives": [objective], "train": {"lr": 1e-4, "lora": True, "max_length": 256}},
                           {"class": cls, **RM, "learning_rate": 1e-4, **extra})
       for objective, cls, extra in [
           ("ranked", "RewardConfig", {"max_length": None, "lora": PEFT_SEQ_CLS}),
           ("binary", "TrainingArguments", {"lora": PEFT_SEQ_CLS}),
           ("imitation", "SFTConfig", {"weight_decay": 0.0, **PACKED(256), "lora": PEFT_CAUSAL})]},
    "compare_post_validation": ({"stage": "compare", "prompts": "{prompts}", "sampling": {"max_new_tokens": 8},
                                 "min_chars": 0, "bad_filter": False, "length_filter": False,
                                 "configurations": [{"name": "a", "system": "preamble"}, {"name": "b"}],
                                 "rubric": [["a"], ["b"]], "post_validation": {"train": {"epochs": 2}}},
                                {"class": "RewardConfig", **RM, "num_train_epochs": 2.0, "max_length": None,
                                 "lora": None}),
    "rlsf": ({"stage": "rlsf", "model": "tiny:llama", "reward_model": "{rm}", "prompts": "{prompts}", "heldout": 2,
              "max_completion_length": 8},
             {"class": "RLOOConfig", **SFT, "learning_rate": 1e-5, "per_device_train_batch_size": 8,
              "warmup_steps": 0.0,
              "lora": PEFT_CAUSAL}),
    "rlsf_custom": ({"stage": "rlsf", "model": "tiny:llama", "reward_model": "{rm}", "prompts": "{prompts}",
                     "heldout": 2, "max_completion_length": 8,
                     "train": {"max_steps": 4, "lr": 1e-4, "lora": False, "grad_accum": 2, "warmup_ratio": 0.1}},
                    {"class": "RLOOConfig", **SFT, "learning_rate": 1e-4, "max_steps": 4,
                     "per_device_train_batch_size": 8,
                     "gradient_accumulation_steps": 2, "warmup_steps": 0.1, "lora": None}),
}


class Stopped(Exception):
    pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, private_cache):
    from selfalign.core.rewards import build_tiny_reward_model

    tmp = tmp_path_factory.mktemp("inputs")

    def jsonl(name, rows):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp / name)

    (tmp / "prompts.txt").write_text("\n".join(f"question {i}?" for i in range(6)) + "\n")
    return {
        "pairs": jsonl("pairs.jsonl", [{"prompt": f"q{i}?", "chosen": f"a good answer {i}.", "rejected": f"bad {i}"}
                                       for i in range(12)]),
        "answers": jsonl("answers.jsonl", [{"prompt": f"q{i}?", "answer": f"answer {i}."} for i in range(6)]),
        "convs": jsonl("convs.jsonl", [{"messages": [{"role": "user", "content": f"q{i}?"},
                                                     {"role": "assistant", "content": f"a {i}."}]} for i in range(6)]),
        "prompts": str(tmp / "prompts.txt"),
        "rm": str(build_tiny_reward_model(tmp / "rm")),
    }


def _fill(value, inputs):
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return inputs[value[1:-1]]
    if isinstance(value, dict):
        return {k: _fill(v, inputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, inputs) for v in value]
    return value


@pytest.mark.parametrize("case", list(GOLDEN))
def test_a_train_block_gives_the_trainer_what_the_flat_keys_gave(case, inputs, tmp_path, monkeypatch):
    import transformers

    seen = {}

    def stop(self, *args, **kwargs):
        model, training_args = kwargs.get("model"), kwargs["args"]
        peft = (getattr(model, "peft_config", None) or {}).get("default")
        seen.update(training_args.to_dict(), **{"class": type(training_args).__name__})
        seen["lora"] = (peft.r, peft.lora_alpha, peft.lora_dropout, str(peft.task_type)) if peft else None
        raise Stopped

    def tokenize(tokenizer, examples, max_length):
        seen["cut_to"] = max_length
        return tokenize_examples(tokenizer, examples, max_length)

    monkeypatch.setattr(transformers.Trainer, "__init__", stop)
    monkeypatch.setattr(training, "tokenize_examples", tokenize)
    stage, expected = GOLDEN[case]
    recipe = parse_recipe({"name": case, "model": "tiny:llama", "engine": {"batch_size": 4},
                           "stages": [_fill(stage, inputs)]})
    with pytest.raises(Stopped):
        run_recipe(recipe, tmp_path / "run")
    expected = {"seed": 0, "data_seed": 0, "save_strategy": "no", "report_to": [], **expected}
    got = {key: seen.get(key) for key in expected}
    got["lr_scheduler_type"] = str(getattr(got["lr_scheduler_type"], "value", got["lr_scheduler_type"]))
    assert got == expected


@pytest.mark.parametrize("key", ["lr", "epochs", "lora", "max_length", "batch_size"])
def test_an_old_flat_training_key_says_move_it_under_train(key):
    with pytest.raises(SelfAlignError) as err:
        parse_recipe({"name": "t", "stages": [{"stage": "engrave", "data": "x", key: 1}]}, "old.yaml")
    assert str(err.value).splitlines() == [f"old.yaml: stages[0].{key}: a training setting: move it under train: "
                                           f"(train.{key})"]
    with pytest.raises(SelfAlignError, match=r"post_validation\.lr: a training setting: move it under train:"):
        parse_recipe({"name": "t", "stages": [{"stage": "compare", "configurations": [{"name": "a"}, {"name": "b"}],
                                               "rubric": ["a", "b"], "post_validation": {"lr": 1e-4}}]}, "old.yaml")


def test_an_old_recipe_fails_in_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    from selfalign.cli import main

    recipe = tmp_path / "old.yaml"
    recipe.write_text("name: old\nmodel: tiny:llama\nstages:\n  - stage: reward_model\n    data: pairs.jsonl\n"
                      "    lr: 1.0e-4\n")
    monkeypatch.setattr(sys, "argv", ["selfalign", "run", str(recipe), "--out", str(tmp_path / "run")])
    monkeypatch.delenv("SELFALIGN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        main()
    out = capsys.readouterr()
    assert stop.value.code == 2 and "Traceback" not in out.err + out.out
    assert f"{recipe}: stages[0].lr: a training setting: move it under train: (train.lr)" in out.err
    assert not (tmp_path / "run").exists()


def test_a_partial_train_block_keeps_the_stages_paper_defaults():
    (sft, rm, pv) = parse_recipe({"name": "t", "stages": [
        {"stage": "sft", "data": "x", "train": {"epochs": 1}},
        {"stage": "reward_model", "data": "x", "train": {"lora": True}},
        {"stage": "compare", "configurations": [{"name": "a"}, {"name": "b"}], "rubric": ["a", "b"],
         "post_validation": {"train": {"epochs": 2}}},
    ]}).stages
    assert (sft.train.lr, sft.train.epochs, sft.train.lora) == (2e-5, 1, False)  # ALMoST's SFT lr, full weights
    assert (rm.train.lr, rm.train.weight_decay, rm.train.scheduler, rm.train.lora) == (2e-5, 0.1, "cosine", True)
    assert (pv.post_validation.train.epochs, pv.post_validation.train.max_length) == (2, 1024)
