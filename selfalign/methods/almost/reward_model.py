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
from selfalign.core.pairs import PAIR_HINT, pair_problem
from selfalign.core.progress import console
from selfalign.core.reward_training import RewardTrainingStage, split_by_prompt
from selfalign.core.store import RowStore, read_jsonl

TRAIN_SAMPLE = 256


class Config(RewardTrainingStage):
    stage: str = "reward_model"
    data: str = Field(..., description="an earlier stage's name or a JSONL file with prompt, chosen, rejected, [kept]")
    heldout: float = Field(0.1, ge=0, lt=1, description="fraction of prompts held out for accuracy (whole prompts)")
    max_pairs: int | None = Field(None, ge=1, description="train on at most N pairs (after the held-out split)")


def load_pairs(path: Path) -> tuple[list[dict], int]:
    """Usable comparison rows of a file (those not marked `kept: false`) and how many were skipped."""
    pairs, skipped = [], 0
    for i, row in enumerate(read_jsonl(path), start=1):
        if problem := pair_problem(row):
            raise SelfAlignError(f"{path}: row {i}: {problem}", PAIR_HINT)
        if row.get("kept", True) is False:
            skipped += 1
            continue
        pairs.append(row)
    return pairs, skipped


def run(ctx, config: Config, folder) -> dict:
    from selfalign.core.reward_training import train_reward_model
    from selfalign.core.rewards import RewardModel
    from selfalign.evals.preference import preference_accuracy

    folder = Path(folder)
    base = ctx.model_for(config)
    source = ctx.rows_file(config.data)
    pairs, skipped = load_pairs(source)
    if not pairs:
        raise SelfAlignError(f"{source}: no usable comparison pairs ({skipped} marked kept: false)",
                             "check the stage that made them (its filters may have dropped every pair)")
    train, heldout = split_by_prompt(pairs, config.heldout, ctx.recipe.seed)
    if cap := ctx.max_prompts(config.max_pairs):
        train = train[:cap]
    store = RowStore(folder)
    (folder / "heldout.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in heldout),
                                          encoding="utf-8")
    console.print(f"  {len(train)} training pairs, {len(heldout)} held out ({skipped} not kept) from {source}")
    ctx.free_accelerator()
    result = train_reward_model(base, train, folder, config.train, ctx.recipe.seed)
    rm = RewardModel(result["model"], max_length=config.train.max_length)
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
