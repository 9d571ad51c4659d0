"""Training scalar-head reward (preference) models on comparison pairs, with TRL's `RewardTrainer`.

Shared by ALMoST's reward model (Kim et al. 2023, §2.3), its as-is post-validation, and the HHH
laboratory's ranked preference models and preference-model pre-training (Askell et al. 2021).

A comparison is `{"prompt", "chosen", "rejected"}`; the loss is Bradley–Terry,
−log σ(r_chosen − r_rejected), TRL's own `RewardTrainer.compute_loss`. The texts are exactly the
ones `selfalign.core.rewards.RewardModel` reads at scoring time (`encode_reward`: plain dialogue, a
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
import random
import time
from pathlib import Path

from pydantic import Field

from selfalign.core.errors import SelfAlignError
from selfalign.core.pairs import PAIR_HINT, pair_problem
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig
from selfalign.core.training import Trainee, TrainSettings, _is_peft, device_and_dtype, fit, output_folder


def reward_training() -> TrainSettings:
    """How a reward (preference) model is trained by default: ALMoST's published reward-model settings
    (full fine-tuning, lr 2e-5, weight decay 0.1, 1 epoch, max length 1024, cosine, 3% warmup; its
    batch of 128 is `batch_size x grad_accum`). The `train:` default of `reward_model`, `pmp`,
    `pm_scaling` and `compare`'s post-validation."""
    return TrainSettings(lora=False, lr=2e-5, weight_decay=0.1, epochs=1.0, max_length=1024, scheduler="cosine",
                         warmup_ratio=0.03)


class RewardTrainingStage(StageConfig):
    """A stage that trains reward (preference) models (`reward_model`, `pmp`, `pm_scaling`): its `train:`
    block defaults to ALMoST's published reward-model settings (`reward_training`)."""

    train: TrainSettings = Field(default_factory=reward_training,
                                 description="how the reward (preference) model is trained: ALMoST's published "
                                             "reward-model settings (all weights, lr 2e-5, weight decay 0.1, 1 epoch, "
                                             "max length 1024, cosine, 3% warmup, batch 128 = batch_size x "
                                             "grad_accum), also where the paper published none (pmp, pm_scaling, "
                                             "there the same for every objective; imitation has no weight decay)")


def split_by_prompt(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): whole prompts go to the held-out side, `fraction` of the distinct prompts."""
    key = lambda p: json.dumps(p["prompt"], sort_keys=True)  # noqa: E731 - prompts may be chats
    prompts = list(dict.fromkeys(key(p) for p in pairs))
    n_held = int(round(len(prompts) * fraction)) if len(prompts) > 1 else 0
    n_held = min(n_held, len(prompts) - 1)
    held = set(random.Random(seed).sample(prompts, n_held)) if n_held > 0 else set()
    return [p for p in pairs if key(p) not in held], [p for p in pairs if key(p) in held]


def is_reward_model(ref: str) -> bool:
    """True when `ref` is already a scalar-head reward model (seq-cls folder or SEQ_CLS adapter)."""
    from selfalign.core.models import resolve

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

    from selfalign.core.models import _from_pretrained, load_model, load_tokenizer, pick_dtype, resolve
    from selfalign.core.rewards import _load_seq_cls

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


def prepare_for_training(base: str, out_dir: str | Path, settings: TrainSettings, seed: int,
                         what: str = "reward model") -> Trainee:
    """A `Trainee` to train a `what` from `base` into `out_dir`: a scalar-head model in training mode,
    its tokenizer, and what it `started_from` (`load_for_reward_training`).

    A LoRA adapter cannot sit on an adapter: with an adapter `base`, the new model is saved merged
    (the trainee's `merge` is true). The fresh score head is drawn from the global generator, seeded
    here; the pad token is set, since the head is read at the last non-pad token."""
    from transformers import set_seed

    from selfalign.core.models import resolve

    started = time.time()
    out_dir = output_folder(out_dir)
    merge = settings.merge
    if settings.lora and not merge and resolve(base).kind == "peft":
        console.print(f"  note: {base} is an adapter; the new {what} is saved merged (an adapter "
                      "cannot sit on an adapter)")
        merge = True
    set_seed(seed)
    model, tokenizer, started_from = load_for_reward_training(base, *device_and_dtype())
    text_cfg = model.config.get_text_config()
    if text_cfg.pad_token_id is None:  # the head is read at the last non-pad token
        text_cfg.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = text_cfg.pad_token_id
    model.train()
    return Trainee(base, settings, out_dir, seed, model, tokenizer, merge, started, started_from)


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    """`chosen_ids` / `rejected_ids` exactly as `RewardModel` encodes them at scoring time."""
    from selfalign.core.rewards import encode_reward

    return [{"chosen_ids": encode_reward(tokenizer, p["prompt"], p["chosen"], max_length),
             "rejected_ids": encode_reward(tokenizer, p["prompt"], p["rejected"], max_length)} for p in pairs]


def check_pairs(pairs: list[dict], source: str = "pairs") -> None:
    for i, p in enumerate(pairs):
        if problem := pair_problem(p):
            raise SelfAlignError(f"{source}[{i}]: {problem}", PAIR_HINT)


def train_reward_model(base: str, pairs: list[dict], out_dir: Path, settings: TrainSettings, seed: int = 0) -> dict:
    """Train a scalar reward model on `pairs` from `base`; save it into `out_dir` (see the module docstring).

    Returns `{"model": folder RewardModel loads, "train_loss", "first_loss", "last_loss", "steps",
    "pairs", "tokens", "started_from", "lora", "wall_s"}`.
    """
    from trl import RewardConfig, RewardTrainer

    if not pairs:
        raise SelfAlignError("no comparison pairs to train a reward model on")
    check_pairs(pairs)
    trainee = prepare_for_training(base, out_dir, settings, seed)
    rows = tokenize_pairs(trainee.tokenizer, pairs, settings.max_length)
    fitted = fit(trainee, rows, trainer_class=RewardTrainer, config_class=RewardConfig,
                 config_args={"max_length": None},  # already truncated from the left above; TRL would drop long pairs
                 peft_task="SEQ_CLS", label="reward model",
                 describe=f"training a reward model from {base} ({trainee.started_from}, {settings.kind}) on "
                          f"{len(rows)} pairs")
    return fitted.save(pairs=len(rows), tokens=sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
                       started_from=trainee.started_from)
