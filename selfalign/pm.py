"""Training scalar-head reward (preference) models on comparison pairs, with TRL's `RewardTrainer`.

Shared by ALMoST's reward model (Kim et al. 2023, §2.3), its as-is post-validation, and the HHH
laboratory's ranked preference models and preference-model pre-training (Askell et al. 2021).

A comparison is `{"prompt", "chosen", "rejected"}`; the loss is Bradley–Terry,
−log σ(r_chosen − r_rejected), TRL's own `RewardTrainer.compute_loss`. The texts are exactly the
ones `selfalign.rewards.RewardModel` reads at scoring time (`encode_reward`: plain dialogue, a
space, the reply, EOS; truncated from the left keeping the BOS), tokenized here and handed to TRL
already processed, so training and scoring can never disagree on the format and nothing is
silently dropped for length (TRL drops pairs longer than `max_length`; here the left of the
prompt is cut instead).

The starting point `base` may be:
- a causal LM (any selfalign reference: `embedded:...`, `tiny:llama`, a folder, a hub id, or a
  causal-LM LoRA adapter, merged first): its body is loaded under a fresh scalar head
  (transformers' `AutoModelForSequenceClassification`, `num_labels=1`, head read at the last
  non-pad token);
- a reward model already (a `ForSequenceClassification` folder, or a SEQ_CLS adapter, merged
  first): training continues from it, head included. This is how a PMP'd model is fine-tuned.

Defaults are ALMoST's published reward-model settings: lr 2e-5, weight decay 0.1, 1 epoch,
max length 1024, cosine schedule, 3% warmup (its batch of 128 is `batch_size × grad_accum`).
With LoRA (task type SEQ_CLS) the new head is trained in full beside the adapter (PEFT's
`modules_to_save`), and the result is an `adapter/` folder that `RewardModel` loads on its base.

Simplifications: no margin term and no reward centring; a pair whose chosen and rejected texts
are identical after truncation is still trained on (its loss gradient is zero).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from selfalign.errors import SelfAlignError
from selfalign.progress import console, progress_bar
from selfalign.training import (
    STATE_FILE,
    LoraSettings,
    _is_peft,
    _progress_callback,
    save_trained,
)


def is_reward_model(ref: str) -> bool:
    """True when `ref` is already a scalar-head reward model (seq-cls folder or SEQ_CLS adapter)."""
    from selfalign.models import resolve

    resolved = resolve(ref)
    path = Path(resolved.path)
    if resolved.kind == "peft":
        cfg = json.loads((path / "adapter_config.json").read_text())
        return cfg.get("task_type") == "SEQ_CLS"
    if resolved.is_local and (path / "config.json").exists():
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        return any(a.endswith("ForSequenceClassification") for a in archs)
    return False


def load_for_reward_training(ref: str, device: str, dtype: str):
    """(seq-cls model with one label, tokenizer, started_from) for `ref`; adapters are merged."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from selfalign.models import _from_pretrained, load_model, load_tokenizer, pick_dtype, resolve
    from selfalign.rewards import _load_seq_cls

    hf_logging.disable_progress_bar()
    resolved = resolve(ref)
    if is_reward_model(ref):
        model, tok = _load_seq_cls(ref, device, dtype)
        if _is_peft(model):
            model = model.merge_and_unload()
        return model, tok, "reward model"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is the point here, not a warning
    try:
        if resolved.kind == "peft":  # a causal-LM adapter: merge it, then move its body under a scalar head
            causal, tok = load_model(resolved, device=device, dtype=dtype)
            causal = causal.merge_and_unload()
            config = causal.config
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
            missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
            if any(not k.startswith("score") for k in missing):
                raise SelfAlignError(f"{ref}: its weights do not fit a sequence classifier (missing {missing[:3]})")
            del causal
        else:
            model = _from_pretrained(AutoModelForSequenceClassification, resolved.path, resolved, num_labels=1,
                                     dtype=pick_dtype(dtype, device))
            tok = load_tokenizer(resolved)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device), tok, "causal LM"


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    """`chosen_ids` / `rejected_ids` exactly as `RewardModel` encodes them at scoring time."""
    from selfalign.rewards import encode_reward

    return [{"chosen_ids": encode_reward(tokenizer, p["prompt"], p["chosen"], max_length),
             "rejected_ids": encode_reward(tokenizer, p["prompt"], p["rejected"], max_length)} for p in pairs]


def check_pairs(pairs: list[dict], source: str = "pairs") -> None:
    for i, p in enumerate(pairs):
        for key in ("prompt", "chosen", "rejected"):
            if key not in p:
                raise SelfAlignError(f"{source}[{i}]: missing field {key!r}", "each comparison needs prompt, chosen, rejected")
        for key in ("chosen", "rejected"):
            if not isinstance(p[key], str):
                raise SelfAlignError(f"{source}[{i}].{key}: must be a string, got {type(p[key]).__name__}")


def train_reward_model(
    base: str,
    pairs: list[dict],
    out_dir: Path,
    *,
    lora: LoraSettings | None,
    lr: float = 2e-5,
    epochs: float = 1.0,
    max_length: int = 1024,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.1,
    scheduler: str = "cosine",
    seed: int = 0,
    merge: bool = False,
    max_steps: int = -1,
) -> dict:
    """Train a scalar reward model on `pairs` from `base`; save it into `out_dir` (see the module docstring).

    Returns `{"model": folder RewardModel loads, "train_loss", "first_loss", "last_loss", "steps",
    "pairs", "tokens", "started_from", "lora", "wall_s"}`.
    """
    import datasets
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    if not pairs:
        raise SelfAlignError("no comparison pairs to train a reward model on")
    check_pairs(pairs)
    t0 = time.time()
    from selfalign.models import resolve

    if lora is not None and not merge and resolve(base).kind == "peft":
        console.print(f"  note: {base} is an adapter; the new reward model is saved merged (an adapter cannot sit on an adapter)")
        merge = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    from transformers import set_seed

    set_seed(seed)  # the fresh score head is drawn from the global generator
    model, tokenizer, started_from = load_for_reward_training(base, "cuda" if cuda else "cpu",
                                                              "bfloat16" if cuda else "float32")
    text_cfg = model.config.get_text_config()
    if text_cfg.pad_token_id is None:  # the head is read at the last non-pad token
        text_cfg.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = text_cfg.pad_token_id
    model.train()
    rows = tokenize_pairs(tokenizer, pairs, max_length)
    examples_per_step = batch_size * grad_accum
    total_steps = max_steps if max_steps > 0 else math.ceil(math.ceil(len(rows) / batch_size) / grad_accum * epochs)

    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="SEQ_CLS")
    args = RewardConfig(
        output_dir=str(out_dir),
        learning_rate=lr,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        warmup_steps=warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=weight_decay,
        lr_scheduler_type=scheduler,
        seed=seed,
        data_seed=seed,
        max_length=None,  # already truncated from the left above; TRL would drop long pairs instead
        bf16=cuda,
        use_cpu=not cuda,
        activation_checkpointing=cuda,
        report_to="none",
        logging_steps=max(1, min(10, total_steps // 50)),
        save_strategy="no",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, peft_config=peft_config)
    finally:
        if bars:
            datasets.enable_progress_bars()
    trainer.remove_callback(PrinterCallback)
    advance_ref: list = [lambda rows_, tokens_: None]
    trainer.add_callback(_progress_callback(advance_ref, examples_per_step))
    kind = f"LoRA r{lora.r}" if lora else "full"
    console.print(f"  training a reward model from {base} ({started_from}, {kind}) on {len(rows)} pairs, "
                  f"{total_steps} steps, lr {lr:g}")
    with progress_bar("reward model", total=total_steps * examples_per_step) as advance:
        advance_ref[0] = advance
        result = trainer.train()
    trainer.state.save_to_json(str(out_dir / STATE_FILE))

    dest = save_trained(trainer.model, tokenizer, base, out_dir, adapter=lora is not None and not merge)
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    return {
        "model": str(dest.resolve()),
        "train_loss": round(float(result.training_loss), 4),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "steps": int(trainer.state.global_step),
        "pairs": len(rows),
        "tokens": sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
        "started_from": started_from,
        "lora": kind,
        "wall_s": round(time.time() - t0, 1),
    }
