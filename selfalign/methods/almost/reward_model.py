"""`reward_model`: a scalar-head reward (preference) model trained on comparison pairs.

ALMoST (Kim et al. 2023, §2.3) trains its reward model on the synthetic comparisons of the
`compare` stage; the HHH laboratory (Askell et al. 2021) trains preference models the same way
(its "ranked" objective). The model reads "Human: prompt / Assistant: reply" + EOS and outputs one
number at the last token; the loss is −log σ(r_chosen − r_rejected) (TRL's `RewardTrainer`, see
`selfalign.core.reward_training`).

    - stage: reward_model
      data: compare                 # an earlier stage's rows (prompt, chosen, rejected; kept: false is skipped)
      heldout: 0.1                  # fraction of prompts held out to measure accuracy

Defaults are ALMoST's: full fine-tuning, lr 2e-5, weight decay 0.1, 1 epoch, max length 1024,
cosine schedule, 3% warmup. `lora: true` trains a LoRA adapter plus the new head instead (what
the CPU recipes use; LoRA wants a larger learning rate, e.g. 1e-4).

Held-out split: pairs are grouped by prompt and whole prompts are held out (a seeded shuffle of
the distinct prompts), so no held-out prompt was seen in training. The stage writes
`heldout.jsonl` (the held-out pairs), `results.json` (held-out accuracy, mean margin, and the
rewards of chosen and rejected replies on the held-out pairs and on up to 256 training pairs: the
run report charts both distributions), `trainer_state.json` and the model (`adapter/` or
`model/`); the done-marker's `model` is what `@reward_model` resolves to, e.g. as the `judge` of
an `eval` stage (HHH `rm` scoring: the 221 BIG-bench pairs) or the reward of `self_play` / `rlsf`.

Simplifications: a killed run trains again from the start (a half-trained model is never marked
done); with fewer than 2 distinct prompts nothing is held out and no held-out accuracy is reported.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field

from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig, Strict
from selfalign.core.store import RowStore, read_jsonl
from selfalign.core.training import lora_settings
from selfalign.methods.self_align.engrave import data_file

TRAIN_SAMPLE = 256


class RewardTraining(Strict):
    """How a reward (preference) model is trained: ALMoST's published reward-model settings as
    defaults. Shared by `reward_model`, `pmp`, `pm_scaling` and `compare`'s post-validation."""

    lora: bool = Field(False, description="LoRA adapter + trained head (else full fine-tuning, as in the papers)")
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lr: float = Field(2e-5, gt=0, description="peak learning rate (ALMoST's reward model: 2e-5)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (ALMoST: 0.1)")
    epochs: float = Field(1.0, gt=0, description="passes over the pairs (ALMoST: 1)")
    max_length: int = Field(1024, ge=8, description="tokens per text, cut from the left (ALMoST: 1024)")
    batch_size: int = Field(4, ge=1, description="pairs per device step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation (ALMoST's batch is 128 pairs = batch_size x grad_accum)")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps with linear warmup (ALMoST: 3%)")
    scheduler: str = Field("cosine", description="learning-rate schedule (ALMoST: cosine)")
    merge: bool = Field(False, description="with LoRA: save a merged plain model instead of the adapter")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: the epochs decide)")

    def train_settings(self, seed: int) -> dict:
        """Keyword arguments of `selfalign.core.reward_training.train_reward_model` / `selfalign.methods.hhh_lab.pm_objectives.train_pm`."""
        return dict(lora=lora_settings(self), lr=self.lr, epochs=self.epochs, max_length=self.max_length,
                    batch_size=self.batch_size, grad_accum=self.grad_accum, warmup_ratio=self.warmup_ratio,
                    weight_decay=self.weight_decay, scheduler=self.scheduler, seed=seed, merge=self.merge,
                    max_steps=self.max_steps)


class Config(RewardTraining, StageConfig):
    stage: str = "reward_model"
    data: str = Field(..., description="an earlier stage's name or a JSONL file with prompt, chosen, rejected, [kept]")
    heldout: float = Field(0.1, ge=0, lt=1, description="fraction of prompts held out for accuracy (whole prompts)")
    max_pairs: int | None = Field(None, ge=1, description="train on at most N pairs (after the held-out split)")


def load_pairs(path: Path) -> tuple[list[dict], int]:
    """Usable comparison rows of a file (those not marked `kept: false`) and how many were skipped."""
    pairs, skipped = [], 0
    for i, row in enumerate(read_jsonl(path), start=1):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise SelfAlignError(f"{path}: row {i} has no {missing[0]!r}", "comparison rows need prompt, chosen and rejected")
        if row.get("kept", True) is False:
            skipped += 1
            continue
        pairs.append(row)
    return pairs, skipped


def split_by_prompt(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): whole prompts go to the held-out side, `fraction` of the distinct prompts."""
    key = lambda p: json.dumps(p["prompt"], sort_keys=True)  # noqa: E731 - prompts may be chats
    prompts = list(dict.fromkeys(key(p) for p in pairs))
    n_held = int(round(len(prompts) * fraction)) if len(prompts) > 1 else 0
    n_held = min(n_held, len(prompts) - 1)
    held = set(random.Random(seed).sample(prompts, n_held)) if n_held > 0 else set()
    return [p for p in pairs if key(p) not in held], [p for p in pairs if key(p) in held]


def run(ctx, config: Config, folder) -> dict:
    from selfalign.core.reward_training import train_reward_model
    from selfalign.core.rewards import RewardModel
    from selfalign.evals.preference import preference_accuracy

    folder = Path(folder)
    base = ctx.model_for(config)
    source = data_file(ctx, config.data)
    pairs, skipped = load_pairs(source)
    if not pairs:
        raise SelfAlignError(f"{source}: no usable comparison pairs ({skipped} marked kept: false)",
                             "check the stage that made them (its filters may have dropped every pair)")
    train, heldout = split_by_prompt(pairs, config.heldout, ctx.recipe.seed)
    if cap := ctx.max_prompts(config.max_pairs):
        train = train[:cap]
    store = RowStore(folder)
    (folder / "heldout.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in heldout), encoding="utf-8")
    console.print(f"  {len(train)} training pairs, {len(heldout)} held out ({skipped} not kept) from {source}")
    ctx.free_accelerator()
    result = train_reward_model(base, train, folder, **config.train_settings(ctx.recipe.seed))
    rm = RewardModel(result["model"], max_length=config.max_length)
    evals = {}
    sample = random.Random(ctx.recipe.seed).sample(train, min(TRAIN_SAMPLE, len(train)))
    evals["train_pairs"] = preference_accuracy(rm, sample)
    if heldout:
        evals["heldout_pairs"] = preference_accuracy(rm, heldout)
    results = {"model": result["model"], "evals": evals}
    (folder / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    accuracy = {k: round(v["metrics"]["preference"]["accuracy"], 4) for k, v in evals.items()}
    console.print("  reward-model accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    summary = {**result, "base": base, "data": str(source), "train_pairs": len(train), "heldout_pairs": len(heldout),
               "skipped": skipped, "accuracy": accuracy}
    store.mark_done(**summary)
    return summary
