"""Three preference-model objectives on the same comparison rows (Askell et al. 2021).

Every objective trains on rows `{"prompt", "chosen", "rejected"}` (the prompt a string or a list
of chat messages) and judges a held-out pair by giving each of its two replies a score; the pair is
right when the chosen reply scores higher (half right on a tie).

- `ranked`: a scalar-head model (`AutoModelForSequenceClassification`, one label) trained on the
  pair with the Bradley–Terry loss log(1 + exp(r_rejected − r_chosen)); TRL's `RewardTrainer`
  does it, through `selfalign.core.reward_training.train_reward_model`. The score is the reward.
- `binary`: the same architecture, but every reply is a sample of its own, labelled good (the
  chosen one) or bad (the rejected one), and the one logit is trained as the log-odds of "good"
  with binary cross-entropy. A pair is judged by comparing the two good-probabilities (the same
  order as the logits, so `selfalign.core.rewards.RewardModel` scores it unchanged).
- `imitation`: the causal LM fine-tuned on prompt → chosen reply only (`selfalign.core.training.sft_train`,
  loss on the reply). A reply's score is its mean log-probability given the prompt, over the tokens
  the imitation loss trains on: the plain-format dialogue (`render_plain`), then " " + reply + EOS.
  The score of a reply is therefore minus its own imitation loss.

The losses are the small pure functions below (`ranked_loss`, `binary_loss`, `imitation_loss`):
the binary trainer calls `binary_loss`; `ranked_loss` is the formula TRL's `RewardTrainer` computes
and `imitation_loss` the causal-LM loss `SFTTrainer` optimises (the tests check both against those).

Texts for the two scalar-head objectives are built like `RewardModel` reads them: `reward_text`
(plain dialogue, " ", reply, EOS), tokenized with the tokenizer's special tokens and truncated
from the left to `max_length`.

Simplifications:
- binary trains one logit with BCE (a 2-way softmax classifier is the same model up to
  parameterisation); samples are shuffled, so a pair's two replies need not share a batch;
- imitation scoring does not renormalise for reply length beyond the mean over tokens; the
  closing EOS is one of the averaged tokens (it is trained on too);
- imitation ignores `weight_decay` (it trains as SFT does, with none).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from selfalign.core.errors import SelfAlignError
from selfalign.core.pairs import PAIR_HINT, pair_problem, pair_verdict
from selfalign.core.training import TrainSettings

OBJECTIVES = ("ranked", "binary", "imitation")


# -- the losses (pure, unit-tested) ---------------------------------------------------------------------
def ranked_loss(r_chosen, r_rejected):
    """Mean of log(1 + exp(r_rejected − r_chosen)) = −log σ(r_chosen − r_rejected): Bradley–Terry."""
    import torch.nn.functional as F

    return F.softplus(r_rejected - r_chosen).mean()


def binary_loss(logits, labels):
    """Mean binary cross-entropy of "good" logits against labels 1 (good) / 0 (bad)."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def imitation_loss(logits, labels, ignore_index: int = -100):
    """Language-model loss: mean cross-entropy of token t+1 given positions ≤ t, over labelled tokens.

    `logits` is (batch, length, vocab), `labels` (batch, length) with `ignore_index` on prompt and
    padding positions: the loss causal LMs (and TRL's `SFTTrainer`) compute.
    """
    import torch.nn.functional as F

    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                           ignore_index=ignore_index)


def mean_logprob(total: float, tokens: int) -> float:
    """A reply's mean per-token log-probability from its summed log-probability."""
    if tokens <= 0:
        raise ValueError("a reply needs at least one scored token")
    return total / tokens


def binary_samples(pairs: Sequence[dict]) -> list[dict]:
    """Each pair as two labelled samples: (prompt, chosen, 1) and (prompt, rejected, 0)."""
    out = []
    for p in pairs:
        out.append({"prompt": p["prompt"], "reply": p["chosen"], "label": 1.0})
        out.append({"prompt": p["prompt"], "reply": p["rejected"], "label": 0.0})
    return out


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def imitation_examples(pairs: Sequence[dict], eos: str) -> list[dict]:
    """`sft_train` examples: plain-format dialogue → " " + chosen reply + EOS (the rejected reply is unused)."""
    from selfalign.core.chat import render_plain

    return [{"prompt": render_plain(_messages(p["prompt"])), "completion": " " + str(p["chosen"]).strip() + eos}
            for p in pairs]


def check_pairs(pairs: Sequence[dict], where: str = "comparison rows") -> None:
    if not pairs:
        raise SelfAlignError(f"{where}: no comparison pairs to train on", "rows need prompt, chosen and rejected")
    for i, p in enumerate(pairs):
        if problem := pair_problem(p):
            raise SelfAlignError(f"{where}: row {i}: {problem}", PAIR_HINT)


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise SelfAlignError(f"unknown preference-model objective {objective!r}",
                             f"choose one of {', '.join(OBJECTIVES)}")


# -- binary discrimination: training ---------------------------------------------------------------------
def encode_samples(tokenizer, samples: Sequence[dict], max_length: int) -> list[dict]:
    """Tokenize labelled samples as `RewardModel` reads texts (reward_text, left truncation)."""
    from selfalign.core.rewards import encode_reward

    return [{"input_ids": encode_reward(tokenizer, s["prompt"], s["reply"], max_length), "labels": float(s["label"])}
            for s in samples]


def _pad_collator(pad_id: int):
    def collate(batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"], dtype=torch.long)
            mask[i, : len(b["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.float32)}

    return collate


def train_binary(base: str, pairs: Sequence[dict], out_dir: Path, settings: TrainSettings, seed: int = 0) -> dict:
    """Binary discrimination: every reply a sample labelled good/bad, BCE on the one logit.

    Saves `out_dir/model/` (full or merged) or `out_dir/adapter/` (LoRA, task type SEQ_CLS), which
    `RewardModel` loads; returns `{"model", "train_loss", "steps", "samples", "wall_s", ...}`.
    """
    from transformers import Trainer, TrainingArguments

    from selfalign.core.reward_training import prepare_for_training
    from selfalign.core.training import fit

    check_pairs(pairs)
    trainee = prepare_for_training(base, out_dir, settings, seed, what="model")
    rows = encode_samples(trainee.tokenizer, binary_samples(pairs), settings.max_length)
    pad_id = trainee.model.config.get_text_config().pad_token_id

    class BinaryTrainer(Trainer):
        loss_is_scaled_for_ga = False  # binary_loss is a per-batch mean

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            loss = binary_loss(outputs.logits.squeeze(-1), labels)
            return (loss, outputs) if return_outputs else loss

    fitted = fit(trainee, rows, trainer_class=BinaryTrainer, config_class=TrainingArguments,
                 config_args={"remove_unused_columns": False}, checkpointing=False,
                 trainer_args={"data_collator": _pad_collator(pad_id)}, peft_task="SEQ_CLS", label="binary PM",
                 describe=f"binary discrimination from {base} ({trainee.started_from}, {settings.kind}) on "
                          f"{len(rows)} samples ({len(pairs)} pairs)")
    return fitted.save(objective="binary", pairs=len(pairs), samples=len(rows),
                       tokens=sum(len(r["input_ids"]) for r in rows), started_from=trainee.started_from)


# -- the dispatcher ---------------------------------------------------------------------------------------
def train_pm(objective: str, base: str, pairs: Sequence[dict], out_dir: Path, settings: TrainSettings,
             seed: int = 0) -> dict:
    """Train a preference model of one objective on `pairs`; returns the trainer's summary with `model`.

    `settings` is the stage's `train:` block, the same for every objective (imitation leaves out its
    weight decay). `base` is a causal LM; for ranked and binary it may also be a reward model to
    continue from (a PMP'd one).
    """
    check_objective(objective)
    check_pairs(pairs)
    pairs = list(pairs)
    if objective == "ranked":
        from selfalign.core.reward_training import train_reward_model

        result = train_reward_model(base, pairs, Path(out_dir), settings, seed)
    elif objective == "binary":
        result = train_binary(base, pairs, Path(out_dir), settings, seed)
    else:
        from selfalign.core.models import load_tokenizer, resolve
        from selfalign.core.training import sft_train

        eos = load_tokenizer(resolve(base)).eos_token or ""
        plain = settings.model_copy(update={"weight_decay": 0.0})  # the language-model loss, as SFT trains it
        result = sft_train(base, imitation_examples(pairs, eos), Path(out_dir), plain, seed)
        result["pairs"] = len(pairs)
    return {**result, "objective": objective}


def load_scorer(objective: str, model: str, batch_size: int = 8, max_length: int = 1024):
    """What `pair_scores` scores with: a `RewardModel` (ranked, binary) or an hf engine (imitation)."""
    check_objective(objective)
    if objective == "imitation":
        from selfalign.core.engines.hf import HFEngine

        return HFEngine(model, batch_size=batch_size, chat_format="plain", max_length=max_length)
    from selfalign.core.rewards import RewardModel

    return RewardModel(model, batch_size=batch_size, max_length=max_length)


def imitation_scores(engine, prompts: Sequence, replies: Sequence[str]) -> list[float]:
    """Mean log-probability of " " + reply + EOS after the plain-format prompt, one per reply."""
    from selfalign.core.engines.base import score_token_rows

    if engine.chat_format != "plain":
        raise SelfAlignError("imitation scoring reads the plain Human:/Assistant: format",
                             "use an engine with chat_format: plain")
    eos = engine.tokenizer.eos_token or ""
    items = [(_messages(p), [" " + str(r).strip() + eos]) for p, r in zip(prompts, replies, strict=True)]
    sums = [s[0] for s in engine.score_many(items)]
    counts = [n for _, n in score_token_rows(engine, items, engine.max_length + 1)]
    return [mean_logprob(s, n) for s, n in zip(sums, counts, strict=True)]


def pair_scores(objective: str, model, pairs: Sequence[dict], batch_size: int = 8,
                max_length: int = 1024) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of a trained preference model on `pairs`.

    `model` is a model reference (a folder `train_pm` returned) or an already loaded scorer
    (`load_scorer`): a reward for ranked, the good-logit for binary, the mean log-probability for imitation.
    """
    check_objective(objective)
    check_pairs(pairs, "held-out pairs")
    own = isinstance(model, str | Path)
    scorer = load_scorer(objective, str(model), batch_size, max_length) if own else model
    try:
        prompts = [p["prompt"] for p in pairs]
        chosen_replies, rejected_replies = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
        if objective == "imitation":
            scores = imitation_scores(scorer, prompts + prompts, chosen_replies + rejected_replies)
        else:
            scores = scorer.score(prompts + prompts, chosen_replies + rejected_replies)
    finally:
        if own and hasattr(scorer, "close"):
            scorer.close()
    n = len(pairs)
    return [float(x) for x in scores[:n]], [float(x) for x in scores[n:]]


def accuracy_of(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    """Accuracy (ties half right), ties and mean margin of pair scores."""
    n = len(chosen)
    if n == 0 or n != len(rejected):
        raise ValueError(f"need as many chosen as rejected scores, got {n} and {len(rejected)}")
    verdicts = [pair_verdict(c, r) for c, r in zip(chosen, rejected, strict=True)]
    return {"accuracy": sum(verdicts) / n, "ties": sum(c == r for c, r in zip(chosen, rejected, strict=True)),
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n, "pairs": n,
            "verdicts": verdicts}


def pair_accuracy(objective: str, model, pairs: Sequence[dict], batch_size: int = 8, max_length: int = 1024) -> dict:
    """`accuracy_of(pair_scores(...))`, with the scores: {"accuracy", "ties", "mean_margin", "pairs", ...}."""
    chosen, rejected = pair_scores(objective, model, pairs, batch_size, max_length)
    return {**accuracy_of(chosen, rejected), "chosen": chosen, "rejected": rejected}
