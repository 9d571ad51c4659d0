"""`pmp`: preference-model pre-training (Askell et al. 2021).

Before a preference model is fine-tuned on the small target comparisons, the paper pre-trains it
as a ranked preference model on a large corpus of public preference-like data (StackExchange
answers ranked by votes, among others) and finds that the *binarised* form of that corpus
transfers best: each pair A > B becomes "A tagged good > A tagged bad" and "B tagged bad > B tagged
good". This stage does that on one corpus and leaves the pre-trained reward model for later stages:

    - stage: pmp
      corpus: data/stackexchange.jsonl   # or an ALMoST compare stage: "@compare"
      binarise: true
    - stage: pm_scaling                 # accuracy vs fine-tuning pairs, with and without PMP
      data: "@compare"
      init: "@pmp"

Corpora (see `selfalign.methods.hhh_lab.pmp_data` for the exact fields read): a StackExchange dump (JSONL, JSON or
Parquet: question, answers with votes and the accepted flag, scored by the paper's rule
round(log2(1 + upvotes)), +1 if accepted, −1 for negative votes; questions need two answers; pairs
of answers with different scores), or comparison rows (`prompt`, `chosen`, `rejected`, e.g. the
synthetic comparisons of an ALMoST `compare` stage, rows with `kept: false` skipped), as an
offline stand-in when no StackExchange dump is at hand.

Training is `selfalign.core.reward_training.train_reward_model` (TRL's `RewardTrainer`, Bradley–Terry) from the
stage's model (a causal LM; a fresh scalar head). Defaults are those of the `reward_model` stage
(ALMoST's published settings: full fine-tuning, lr 2e-5, weight decay 0.1, 1 epoch, max length
1024, cosine, 3% warmup); the paper's PMP hyperparameters are not used here.

Output: `rows.jsonl` (the comparisons trained on, binarised if asked, each with an id and its
source fields: `question_id`, `chosen_score`, `rejected_score`, `binarised`), `heldout.jsonl` (the
held-out pairs, raw), `results.json` (held-out accuracy in the trained form and on the raw pairs),
`trainer_state.json`, the model (`model/` or `adapter/`), and the done-marker, whose `model` is the
PMP'd reward model: `init: "@pmp"` on `pm_scaling`, `model: "@pmp"` on `reward_model` or `judge`.

Simplifications: the held-out split is by whole prompts (questions), a fraction `heldout` of them,
at most `max_heldout` pairs; a killed run keeps its rows but trains again from the start (a
half-trained model is never marked done); one corpus per stage (chain stages to mix corpora).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from selfalign.core.errors import SelfAlignError
from selfalign.core.progress import console
from selfalign.core.reward_training import RewardTrainingStage
from selfalign.core.store import RowStore, row_id
from selfalign.methods.hhh_lab.pmp_data import binarise, load_corpus, source_path

WRITE_CHUNK = 1000


class Config(RewardTrainingStage):
    stage: str = "pmp"
    corpus: str = Field(..., description="StackExchange file/folder (JSONL, JSON, Parquet), a JSONL of prompt/chosen/"
                                         "rejected, or an earlier stage's rows (@compare)")
    format: Literal["auto", "stackexchange", "pairs"] = Field(
        "auto", description="corpus layout; auto: rows with `answers` are StackExchange, with chosen/rejected pairs")
    binarise: bool = Field(True,
                           description="binarise each pair into two good/bad-tagged comparisons (the paper's best)")
    max_pairs: int | None = Field(None, ge=1, description="read at most the first N corpus pairs (before binarising)")
    max_pairs_per_question: int | None = Field(None, ge=1, description="StackExchange: a seeded sample of at most N "
                                               "pairs per question (default: every pair; not published)")
    heldout: float = Field(0.05, ge=0, lt=1, description="fraction of prompts held out to measure accuracy")
    max_heldout: int = Field(500, ge=0, description="at most this many held-out pairs are scored")


def comparison_rows(pairs: list[dict], stage: str) -> list[dict]:
    """Rows with ids. The position is part of the id: binarising two pairs that share an answer
    gives the same tagged comparison twice, and both are trained on, as each pair is binarised alone."""
    return [{"id": row_id(stage, i, p["prompt"], p["chosen"], p["rejected"]), **p} for i, p in enumerate(pairs)]


def run(ctx, config: Config, folder) -> dict:
    from selfalign.core.reward_training import split_by_prompt, train_reward_model
    from selfalign.core.rewards import RewardModel
    from selfalign.evals.preference import preference_accuracy

    folder = Path(folder)
    base = ctx.model_for(config)
    source = source_path(ctx, config.corpus)
    cap = ctx.max_prompts(config.max_pairs)
    pairs, stats = load_corpus(source, config.format, cap, config.max_pairs_per_question, ctx.recipe.seed)
    if not pairs:
        raise SelfAlignError(f"corpus {source}: no comparison pairs ({stats})",
                             "StackExchange questions need two answers with different scores; rows need kept not false")
    train, heldout = split_by_prompt(pairs, config.heldout, ctx.recipe.seed)
    heldout = random.Random(ctx.recipe.seed).sample(heldout, min(len(heldout), config.max_heldout))
    trained_on = binarise(train) if config.binarise else train
    store = RowStore(folder)
    rows = comparison_rows(trained_on, config.label)
    for start in range(0, len(rows), WRITE_CHUNK):  # ids make a rerun append nothing twice
        store.append(rows[start: start + WRITE_CHUNK])
    (folder / "heldout.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in heldout),
                                          encoding="utf-8")
    console.print(f"  {len(train)} corpus pairs from {source} ({stats['format']}), {len(heldout)} held out; "
                  f"training on {len(trained_on)} comparisons{' (binarised)' if config.binarise else ''}")
    ctx.free_accelerator()
    result = train_reward_model(base, [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows], folder,
                                config.train, ctx.recipe.seed)
    evals = {}
    if heldout:
        rm = RewardModel(result["model"], max_length=config.train.max_length)
        evals["heldout_raw"] = preference_accuracy(rm, heldout)
        if config.binarise:
            evals["heldout_binarised"] = preference_accuracy(rm, binarise(heldout))
    accuracy = {k: round(v["metrics"]["preference"]["accuracy"], 4) for k, v in evals.items()}
    if accuracy:
        console.print("  PMP accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    (folder / "results.json").write_text(json.dumps({"model": result["model"], "evals": evals}, indent=2),
                                         encoding="utf-8")
    summary = {**result, "base": base, "corpus": str(source), "corpus_stats": stats, "binarised": config.binarise,
               "corpus_pairs": len(train), "comparisons": len(rows), "heldout_pairs": len(heldout),
               "accuracy": accuracy}
    store.mark_done(**summary)
    return summary
