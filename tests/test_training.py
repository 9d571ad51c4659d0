"""Fine-tuning on tiny:llama: masking, truncation, LoRA and full training, saving, and the engrave stage."""

import json
from pathlib import Path

import pytest

from selfalign.core.errors import SelfAlignError
from selfalign.core.training import (
    IGNORE,
    TrainSettings,
    build_example,
    estimate_steps,
    model_output,
    sft_train,
    tokenize_examples,
)

EOS = "<eos>"  # the tiny byte tokenizer's EOS


def qa(i: int) -> dict:
    return {"prompt": f"Human: what is {i} plus {i}?\n\nAssistant:", "completion": f" It is {2 * i}.{EOS}"}


# -- masking and truncation (pure) ----------------------------------------------------------------------
def test_build_example_masks_the_prompt_and_appends_eos():
    row, cut = build_example([1, 10, 11], [1, 10, 11, 20, 21], max_length=16, bos_id=1, eos_id=2)
    assert row == {"input_ids": [1, 10, 11, 20, 21, 2], "labels": [IGNORE] * 3 + [20, 21, 2]} and not cut


def test_build_example_cuts_the_prompt_from_the_left_keeping_bos_and_the_answer():
    row, cut = build_example([1, 10, 11, 12, 13], [1, 10, 11, 12, 13, 20, 21, 2], max_length=5, bos_id=1, eos_id=2)
    assert cut and row["input_ids"] == [1, 13, 20, 21, 2] and row["labels"] == [IGNORE, IGNORE, 20, 21, 2]
    # an answer that cannot fit with the BOS is dropped, not cut
    assert build_example([1, 10], [1, 10, 20, 21, 22, 2], max_length=4, bos_id=1, eos_id=2) == (None, False)


def test_tokenize_examples_labels_only_the_completion(private_cache):
    from selfalign.core.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve("tiny:llama"))
    long = {"prompt": "x" * 100 + qa(1)["prompt"], "completion": qa(1)["completion"]}
    rows, counts = tokenize_examples(tok, [qa(3), long, {"prompt": "Q:", "completion": " " + "y" * 80}], max_length=48)
    assert counts == {"dropped_too_long": 1, "prompt_truncated": 1} and len(rows) == 2
    for row in rows:
        answer = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE]
        assert answer == row["input_ids"][-len(answer):]  # one contiguous tail
        assert tok.decode(answer) == (" It is 6.<eos>" if row is rows[0] else " It is 2.<eos>")
        assert row["input_ids"][0] == tok.bos_token_id and len(row["input_ids"]) <= 48
    assert tok.decode(rows[0]["input_ids"], skip_special_tokens=True) == qa(3)["prompt"] + " It is 6."


# -- training -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(private_cache, tmp_path_factory):
    """One LoRA run of 30 steps on 12 examples (10 epochs), recording the dataset SFTTrainer trained on."""
    import trl

    seen = {}

    class Recording(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["dataset"] = self.train_dataset
            seen["collator"] = self.data_collator

    out = tmp_path_factory.mktemp("lora")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "SFTTrainer", Recording)
        result = sft_train("tiny:llama", [qa(i) for i in range(12)], out,
                           TrainSettings(lr=1e-2, epochs=10, max_length=64, batch_size=4, warmup_ratio=0.1))
    return out, result, seen["dataset"], seen["collator"]


def test_lora_adapter_resolves_and_changes_the_model(lora_run):
    import torch

    from selfalign.core.models import load_model, resolve

    out, result, *_ = lora_run
    assert result["model"] == model_output(out) and result["model"].endswith("adapter")
    assert result["steps"] == 30 and result["examples"] == 12
    resolved = resolve(result["model"])
    assert resolved.kind == "peft" and resolved.base.kind == "tiny"
    tuned, tok = load_model(result["model"], device="cpu")
    base, _ = load_model("tiny:llama", device="cpu")
    ids = tok(qa(5)["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, base(ids).logits, atol=1e-3)


def test_trainer_sees_prompt_masked_labels(lora_run):
    _, _, dataset, _ = lora_run
    for row in dataset:
        labels = row["labels"]
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        assert first > 20 and all(lab != IGNORE for lab in labels[first:])  # prompt masked, answer trained
        assert labels[first:] == row["input_ids"][first:] and labels[-1] == 2  # ... through its EOS


def test_a_batch_runs_padding_free(lora_run):
    """The trainer's batches are the examples end to end in one row, position ids restarting at each
    example, with no attention mask (transformers then masks each example off from the others)."""
    _, _, dataset, collator = lora_run
    rows = [dataset[i] for i in range(3)]
    batch = collator(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (1, total) and "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, len(rows[0]["input_ids"]), len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_padding_free_batch_has_the_padded_batchs_loss_and_gradients(arch):
    """One row of examples end to end gives the loss and gradients of the same examples padded, on
    both architectures; gemma3's sliding window (64) is shorter than two of the examples."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from selfalign.core.tiny import build_tiny_model

    model = build_tiny_model(arch)
    model.train()
    gen = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in [(90, 30), (40, 10), (130, 70), (20, 5)]:
        ids = torch.randint(4, 200, (length,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})

    def loss_and_grads(padding_free: bool):
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)([dict(e) for e in examples])
        model.zero_grad()
        loss = model(**{k: v for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask",
                                                                  "position_ids")}, use_cache=False).loss
        loss.backward()
        return batch["input_ids"].numel(), loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    padded_tokens, padded, padded_grads = loss_and_grads(False)
    packed_tokens, packed, packed_grads = loss_and_grads(True)
    assert packed_tokens == 280 < padded_tokens == 4 * 130
    assert torch.allclose(packed, padded, atol=1e-6)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_loss_goes_down_and_state_is_saved(lora_run):
    out, result, *_ = lora_run
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [x["loss"] for x in state["log_history"] if "loss" in x]
    assert len(losses) >= 5 and losses[-1] < 0.5 * losses[0]
    assert result["last_loss"] < result["first_loss"]
    lrs = [x["learning_rate"] for x in state["log_history"] if "learning_rate" in x]
    assert lrs[0] < max(lrs) and lrs[-1] < 0.2 * max(lrs)  # linear warmup, then linear decay


@pytest.mark.parametrize("lora", [{"lora": False}, {"r": 4, "alpha": 8}], ids=["full", "lora-merged"])
def test_full_and_merged_training_write_a_plain_model(private_cache, tmp_path, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = sft_train("tiny:llama", [qa(i) for i in range(4)], tmp_path,
                       TrainSettings(**lora, lr=1e-3, epochs=1, max_length=64, batch_size=2, merge=True, max_steps=2))
    assert result["steps"] == 2 and result["model"] == model_output(tmp_path) and result["model"].endswith("model")
    assert (tmp_path / "model" / "model.safetensors").exists() and not (tmp_path / "adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(result["model"])
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(result["model"]).eos_token == EOS


def test_step_estimate_counts_a_short_last_accumulation_as_a_step():
    assert estimate_steps(5, batch_size=2, grad_accum=2, epochs=3) == 6  # 3 batches -> 2 steps an epoch
    assert estimate_steps(5, batch_size=2, grad_accum=2, epochs=1.5) == 3
    assert estimate_steps(8, batch_size=2, grad_accum=1, epochs=2) == 8
    assert estimate_steps(5, batch_size=2, grad_accum=2, epochs=3, max_steps=4) == 4


def test_progress_bar_total_matches_the_steps_trained_with_grad_accum(private_cache, tmp_path, monkeypatch):
    from contextlib import contextmanager

    import selfalign.core.training as training

    bars = []

    @contextmanager
    def recording_bar(description, total, already_done=0):
        bar = {"total": total, "rows": 0}
        bars.append(bar)
        yield lambda rows, tokens: bar.update(rows=bar["rows"] + rows)

    monkeypatch.setattr(training, "progress_bar", recording_bar)
    result = sft_train("tiny:llama", [qa(i) for i in range(5)], tmp_path,
                       TrainSettings(r=4, lr=1e-3, epochs=3, max_length=64, batch_size=2, grad_accum=2))
    assert result["steps"] == estimate_steps(5, 2, 2, 3) == 6
    assert bars == [{"total": 6 * 4, "rows": 6 * 4}]  # the bar ends full: every step advanced it


def test_model_output_of_an_empty_folder_is_an_error(tmp_path):
    with pytest.raises(SelfAlignError, match="no trained model"):
        model_output(tmp_path)


# -- the engrave stage ----------------------------------------------------------------------------------
def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_engrave_stage_end_to_end(private_cache, tmp_path):
    from selfalign.core.assets_io import yaml_key
    from selfalign.stages import parse_recipe, run_recipe

    data = write_rows(tmp_path / "answers.jsonl", [
        {"id": f"r{i}", "prompt": f"Name a colour number {i}.", "answer": f"Colour {i} is blue.", "kept": i % 3 != 0,
         "thoughts": "internal thoughts are not trained on"} for i in range(9)
    ] + [{"id": "x", "prompt": "No answer here", "answer": ""}])
    recipe = parse_recipe({"name": "t", "model": "tiny:llama", "stages": [
        {"stage": "engrave", "data": str(data), "train": {"max_length": 96, "batch_size": 2, "epochs": 1}},
        {"stage": "generate", "model": "@engrave", "prompts": "builtin:quickstart", "max_prompts": 1,
         "sampling": {"max_new_tokens": 4}},
    ]})
    record = run_recipe(recipe, tmp_path / "run")
    folder = tmp_path / "run" / "01-engrave"
    examples = [json.loads(x) for x in (folder / "examples.jsonl").read_text().splitlines()]
    assert [e["id"] for e in examples] == ["r1", "r2", "r4", "r5", "r7", "r8"]  # kept rows with an answer only
    system = yaml_key("builtin:self_align/system_prompts.yaml", "engraved")
    first = examples[0]
    assert first["prompt"] == f"{system}\n\nHuman: Name a colour number 1.\n\nAssistant:"
    assert first["completion"] == f" Colour 1 is blue.{EOS}" and "thoughts" not in first["prompt"]
    summary = record["stages"]["engrave"]["summary"]
    assert summary["model"] == str((folder / "adapter").resolve()) and summary["examples"] == 6
    assert summary["skipped"] == {"not kept": 3, "no prompt or answer": 1}
    assert json.loads((folder / "_done.json").read_text())["model"] == summary["model"]
    assert sorted(p.name for p in folder.iterdir()) == ["_done.json", "adapter", "examples.jsonl", "trainer_state.json"]
    assert record["stages"]["generate"]["summary"]["rows"] == 1  # a later stage loads the adapter via @engrave
    assert any(i["source"] == "builtin:self_align/system_prompts.yaml#engraved" for i in record["inputs"])


def test_engrave_without_usable_rows_names_the_file(private_cache, tmp_path):
    from selfalign.stages import parse_recipe, run_recipe

    data = write_rows(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "p", "answer": "a", "kept": False}])
    recipe = parse_recipe({"name": "t", "model": "tiny:llama", "stages": [{"stage": "engrave", "data": str(data)}]})
    with pytest.raises(SelfAlignError, match=r"bad.jsonl: no usable rows"):
        run_recipe(recipe, tmp_path / "run")


def test_engrave_reads_an_earlier_stage_and_literal_system_text(tmp_path):
    from selfalign.core.pipeline import RunContext
    from selfalign.methods.self_align import engrave
    from selfalign.stages import parse_recipe

    recipe = parse_recipe({"name": "t", "stages": [{"stage": "engrave", "data": "answers", "system": "Be kind."}]})
    ctx = RunContext(recipe=recipe, run_dir=tmp_path, stage_dirs={"answers": tmp_path / "02-answers"})
    write_rows((tmp_path / "02-answers").mkdir() or tmp_path / "02-answers" / "rows.jsonl", [])
    assert ctx.rows_file("answers") == tmp_path / "02-answers" / "rows.jsonl"
    with pytest.raises(SelfAlignError, match="neither an earlier stage"):
        ctx.rows_file("nope")
    assert engrave.system_text(recipe.stages[0].system) == "Be kind."
    assert recipe.stages[0].human_inputs() == [("engrave.system", "Be kind.")]
    with pytest.raises(SelfAlignError, match="engravd"):
        engrave.system_text("builtin:self_align/system_prompts.yaml#engravd")


def test_a_sharded_launch_saves_through_the_trainers_collective_save(tmp_path):
    """Under fsdp/zero3 no process holds the whole model: the trainer's save_model (a collective that
    gathers the weights) writes the folder; selfalign adds the base reference and the tokenizer."""
    from types import SimpleNamespace

    from selfalign.core.tiny import build_byte_tokenizer
    from selfalign.core.training import BASE_FILE, Fitted, TrainSettings, save_sharded, shards_parameters

    saved = []

    class FakeTrainer:
        accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"))
        model = object()
        state = SimpleNamespace(global_step=3, log_history=[{"loss": 1.0}, {"loss": 0.5}])

        def save_model(self, folder):
            saved.append(folder)
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"weights")

    trainer = FakeTrainer()
    assert shards_parameters(trainer) and not shards_parameters(SimpleNamespace(accelerator=None))
    fitted = Fitted(trainer=trainer, result=SimpleNamespace(training_loss=0.75), tokenizer=build_byte_tokenizer(),
                    base="tiny:llama", out_dir=tmp_path, settings=TrainSettings(), merge=False, started=0.0,
                    total_steps=3)
    summary = fitted.save()
    dest = Path(summary["model"])
    assert len(saved) == 1 and dest == (tmp_path / "adapter").resolve()
    assert (dest / "adapter_model.safetensors").read_bytes() == b"weights" and (dest / BASE_FILE).exists()
    assert (dest / "tokenizer_config.json").exists() and not (tmp_path / "adapter.partial").exists()

    import peft

    trainer.model = peft.PeftModel.__new__(peft.PeftModel)  # a LoRA model: merging it needs every shard
    with pytest.raises(SelfAlignError, match="merge"):
        save_sharded(trainer, build_byte_tokenizer(), "tiny:llama", tmp_path, adapter=False)
