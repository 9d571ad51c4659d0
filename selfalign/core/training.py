"""Supervised fine-tuning, shared by every training stage: TRL's `SFTTrainer`, LoRA or full.

Every stage that fine-tunes (Principle Engraving, Verbose Cloning, ALMoST's SFT) hands
`sft_train` a list of `{"prompt", "completion"}` examples: the prompt is the full text the model
sees before its answer (the caller renders system prompt and dialogue with `render_plain`), the
completion is `" " + answer + eos`. The loss is on the completion tokens only.

Tokenization is done here, not by TRL, for one reason: truncation. TRL 1.16 tokenizes
prompt + completion and cuts long sequences at `max_length` keeping the *start* (its only
supported mode; `keep_end` is deprecated), which cuts the end of the answer and its EOS, and drops
examples whose prompt alone fills `max_length`. Here instead:

- the prompt is cut from the left (the BOS token, when the tokenizer adds one, stays first), so
  the answer and its EOS are always trained on whole;
- an example whose completion alone (plus BOS) is longer than `max_length` is dropped and counted
  (`dropped_too_long` in the result), rather than trained on a headless fragment.

The mask follows TRL's own rule: the whole text is tokenized once, and the completion starts where
the tokenized prompt and the tokenized prompt + completion diverge (`common_prefix_length`), so
tokens merging across the boundary are handled the way TRL handles them. The result is a dataset
of `input_ids` + `labels` (prompt positions -100), which `SFTTrainer` takes as already processed.

**Padding-free batches.** A batch's examples run end to end as one row (TRL's `padding_free`), with
position ids that restart at each example. From those position ids transformers builds a
block-diagonal causal mask for every attention implementation (sdpa and eager too, not only flash
attention), so no example sees another, and the loss and gradients equal the padded batch's
(`tests/test_training.py`). A padded batch pays the body's forward and backward at every padding
position, which on a CPU is time spent on nothing.

Simplification: a multi-turn dialogue with loss on every assistant turn (ALMoST's SFT) is given
as several examples, one per assistant turn, each prompt holding the dialogue so far. The
gradient is the same as one masked sequence up to how turns are weighted in the mean, at the cost
of recomputing the shared prefix once per turn.

Outputs in `out_dir`: `adapter/` (LoRA, PEFT format, with `selfalign_base.json` beside it naming
the base as a selfalign reference, which `selfalign.core.models.resolve` prefers) or `model/` (full fine-tuning or
`merge=True`: a plain `save_pretrained` folder), the tokenizer beside either, and
`trainer_state.json` (the HF trainer state, whose `log_history` the run report plots).

**One settings value, one skeleton.** Every training stage has a `train:` block, a `TrainSettings`
(LoRA, learning rate, epochs, lengths, batch, schedule; each field described, the stage's paper
values as its defaults), and hands it whole to `fit`, the one trainer skeleton: it wraps the model
in LoRA (or lets a TRL trainer do it), builds the `TrainingArguments` every trainer shares
(`common_training_args`), runs the trainer under selfalign's progress bar, and saves the result.
What it trains is a `Trainee`: the loaded model and tokenizer with the base they came from, the
settings, the seed, the output folder, whether to save merged and when training started. What
differs between trainers (how the model is loaded, the data, the trainer class, a few arguments of
its own) is what the caller passes: SFT here (`sft_train`), reward models
(`selfalign.core.reward_training`), binary and imitation PMs (`selfalign.methods.hhh_lab.pm_objectives`),
RLOO (`selfalign.methods.almost.rloo`) and context distillation (`selfalign.methods.hhh_lab.distill`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from selfalign.core.chat import attach_plain_template
from selfalign.core.errors import SelfAlignError
from selfalign.core.launcher import SAVE_STEPS_ENV
from selfalign.core.models import load_model, resolve
from selfalign.core.progress import console, progress_bar
from selfalign.core.recipe import Strict
from selfalign.core.training_speed import head_at_label_positions

IGNORE = -100  # the label the loss ignores
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
BASE_FILE = "selfalign_base.json"


class TrainSettings(Strict):
    """How a stage trains: the `train:` block of every training stage, handed whole to `fit`.

    The class defaults are Self-Align's Principle Engraving (Sun et al. 2023: LoRA r 16, alpha 16,
    dropout 0.05 on q/k/v/o; lr 4e-4; 1 epoch; max length 512; warmup then linear decay). A stage
    whose paper trains otherwise gives its own defaults (`train: TrainSettings = Field(default_factory=
    lambda: TrainSettings(lr=2e-5, ...))`); a recipe's partial block changes only the keys it names.
    """

    lora: bool = Field(True, description="train a LoRA adapter on q/k/v/o (else all weights)")
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lr: float = Field(4e-4, gt=0, description="peak learning rate, reached after the warmup")
    epochs: float = Field(1.0, gt=0, description="passes over the training data")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: the epochs decide)")
    max_length: int = Field(512, ge=8, description="tokens per training example; a longer prompt is cut from the left")
    batch_size: int = Field(4, ge=1, description="examples per device step (not published for most steps)")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps: the batch is batch_size x grad_accum")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of the steps with linear warmup")
    scheduler: str = Field("linear", description="learning-rate schedule after warmup (transformers' names: linear, "
                                                 "cosine, constant, ...)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    merge: bool = Field(False, description="with LoRA: merge the adapter into the weights and save a plain model")

    def peft_config(self, task_type: str):
        """PEFT's `LoraConfig` of these settings for `task_type` (CAUSAL_LM, SEQ_CLS); None without LoRA."""
        if not self.lora:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(LORA_TARGETS), task_type=task_type)

    @property
    def kind(self) -> str:
        """How a summary names the kind of training: `LoRA r16` or `full`."""
        return f"LoRA r{self.r}" if self.lora else "full"


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention projections, as Self-Align


# -- tokenization (pure, unit-tested) ---------------------------------------------------------------
def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def build_example(prompt_ids: list[int], full_ids: list[int], max_length: int, bos_id: int | None,
                  eos_id: int | None) -> tuple[dict | None, bool]:
    """(`{"input_ids", "labels"}` or None if the completion cannot fit, whether the prompt was cut).

    `full_ids` is the tokenized prompt + completion; the completion starts where it and `prompt_ids`
    diverge. An EOS is appended if the completion does not end with one. A too-long example loses
    prompt tokens from the left, after a leading BOS.
    """
    split = common_prefix_length(prompt_ids, full_ids)
    head, completion = list(full_ids[:split]), list(full_ids[split:])
    if eos_id is not None and (not completion or completion[-1] != eos_id):
        completion.append(eos_id)
    bos = [head.pop(0)] if head and bos_id is not None and head[0] == bos_id else []
    room = max_length - len(bos) - len(completion)
    if room < 0 or not completion:
        return None, False
    cut = len(head) > room
    head = head[len(head) - room:] if cut else head
    ids = bos + head + completion
    labels = [IGNORE] * (len(bos) + len(head)) + completion
    return {"input_ids": ids, "labels": labels}, cut


def tokenize_examples(tokenizer, examples: list[dict], max_length: int) -> tuple[list[dict], dict]:
    """Tokenize prompt/completion examples into input_ids + labels; also counts of what was cut."""
    rows, dropped, cut = [], 0, 0
    for ex in examples:
        prompt_ids = tokenizer(ex["prompt"], add_special_tokens=True)["input_ids"]
        full_ids = tokenizer(ex["prompt"] + ex["completion"], add_special_tokens=True)["input_ids"]
        row, was_cut = build_example(prompt_ids, full_ids, max_length, tokenizer.bos_token_id, tokenizer.eos_token_id)
        if row is None:
            dropped += 1
            continue
        cut += was_cut
        rows.append(row)
    return rows, {"dropped_too_long": dropped, "prompt_truncated": cut}


# -- training -----------------------------------------------------------------------------------------
def _base_reference(base: str) -> str:
    """The base reference as later runs should see it: an existing path made absolute."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def _progress_callback(examples_per_step: int):
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """Drives selfalign's progress bar (examples/s, tokens/s) instead of tqdm; `advance` is the bar's."""

        tokens = 0

        def advance(self, rows: int, tokens: int) -> None:
            pass

        def on_step_end(self, args, state, control, **kwargs):
            seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            self.advance(examples_per_step, seen - self.tokens)
            self.tokens = seen

    return _Progress()


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _atomic_save(dest: Path, write) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def save_trained(trained, tokenizer, base: str, out_dir: Path, adapter: bool) -> Path:
    """Save a trained model into `out_dir`: `adapter/` (PEFT, with `selfalign_base.json` naming the base
    as a selfalign reference, which `selfalign.core.models.resolve` prefers) or `model/` (a plain
    `save_pretrained` folder; an adapter is merged first), the tokenizer beside either. Written to a
    temporary folder and renamed, so a killed save never leaves a half-written model. The tokenizer
    carries the plain-transcript chat template the stages trained on, so any loader prompts alike."""
    attach_plain_template(tokenizer)
    if adapter:
        dest = out_dir / ADAPTER_DIR

        def write(folder: Path) -> None:
            trained.save_pretrained(folder)
            (folder / BASE_FILE).write_text(json.dumps({"base": _base_reference(base)}, indent=2))
            tokenizer.save_pretrained(folder)
    else:
        dest = out_dir / MODEL_DIR
        plain = trained.merge_and_unload() if _is_peft(trained) else trained

        def write(folder: Path) -> None:
            plain.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
    from selfalign.core.ranks import barrier, is_follower

    if not is_follower():  # under a launch the main process saves; the others wait for it
        _atomic_save(dest, write)
    barrier()
    return dest


def shards_parameters(trainer) -> bool:
    """The trainer runs under FSDP or DeepSpeed (a `launcher:` with `fsdp`, `zero2` or `zero3`): no
    process holds the whole model, so saving is a collective the trainer itself does."""
    accelerator = getattr(trainer, "accelerator", None)
    kind = getattr(getattr(accelerator, "distributed_type", None), "name", "")
    return kind in ("FSDP", "DEEPSPEED")


def save_sharded(trainer, tokenizer, base: str, out_dir: Path, adapter: bool) -> Path:
    """`save_trained` for a sharded launch: every process calls the trainer's `save_model`, which gathers
    the full state dict (FSDP's FULL_STATE_DICT, DeepSpeed's 16-bit weights on save) and lets the main
    process write it; the main process then adds the base reference and the tokenizer and renames the
    folder into place. Merging an adapter needs the whole model in one process, so it is refused."""
    from selfalign.core.ranks import barrier, is_follower

    if not adapter and _is_peft(trainer.model):
        raise SelfAlignError("train.merge under fsdp/zero2/zero3: merging a LoRA adapter needs the whole model in "
                             "one process", "set train.merge: false, then `selfalign export RUN --to DIR` merges it")
    dest = out_dir / (ADAPTER_DIR if adapter else MODEL_DIR)
    tmp = dest.with_name(dest.name + ".partial")
    if not is_follower():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    trainer.save_model(str(tmp))  # a collective: every process takes part
    if not is_follower():
        attach_plain_template(tokenizer)
        if adapter:
            (tmp / BASE_FILE).write_text(json.dumps({"base": _base_reference(base)}, indent=2))
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.replace(dest)
    barrier()
    return dest


def device_and_dtype() -> tuple[str, str]:
    """Where and in what precision a model is trained: bfloat16 on a GPU, float32 on the CPU."""
    import torch

    return ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")


def estimate_steps(examples: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int = -1) -> int:
    """Optimizer steps as the Trainer counts them: a last, short accumulation still makes a step."""
    if max_steps > 0:
        return max_steps
    return math.ceil(epochs * math.ceil(math.ceil(examples / batch_size) / grad_accum))


def common_training_args(out_dir: Path, settings: TrainSettings, seed: int, total_steps: int, *,
                         batch_size: int | None = None, logging_steps: int | None = None, checkpointing: bool = True,
                         count_tokens: bool = True) -> dict:
    """The `TrainingArguments` keywords every selfalign trainer shares (TRL's configs take them too).

    bf16 on a GPU, the CPU otherwise; no saving, no reporting, no tqdm (`run_trainer` draws the
    progress bar); a loss logged about 50 times a run, at least every 10 steps (`logging_steps`
    overrides); `batch_size` overrides the settings' (RLOO's batch is counted in replies);
    `checkpointing`: activation checkpointing on a GPU (on the CPU it only costs time);
    `count_tokens`: count the non-padding input tokens, which the progress bar shows as tokens/s.
    """
    import torch

    cuda = torch.cuda.is_available()
    args = dict(
        output_dir=str(out_dir),
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=batch_size or settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        warmup_steps=settings.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=settings.scheduler,
        weight_decay=settings.weight_decay,
        seed=seed,
        data_seed=seed,
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        logging_steps=logging_steps if logging_steps is not None else max(1, min(10, total_steps // 50)),
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if checkpointing:
        args["activation_checkpointing"] = cuda
    if count_tokens:
        args["include_num_input_tokens_seen"] = "non_padding"
    if steps := os.environ.get(SAVE_STEPS_ENV):  # under a `launcher:` launch: checkpoints, so a killed launch resumes
        args.update(save_strategy="steps", save_steps=int(steps), save_total_limit=1)
    return args


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' progress bars for a while: TRL's passes over an already tokenized dataset take milliseconds."""
    import datasets

    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def run_trainer(trainer, label: str, total_steps: int, examples_per_step: int, out_dir: Path):
    """`trainer.train()` under selfalign's progress bar (`label`, `total_steps` × `examples_per_step`
    examples), without the trainer's log line a step; then the trainer state, whose `log_history`
    the run report plots, saved as `out_dir/trainer_state.json`. Returns what `train()` returns."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # one log line a step is noise; the losses go to trainer_state.json
    progress = _progress_callback(examples_per_step)
    trainer.add_callback(progress)
    resume = _last_checkpoint(out_dir) if os.environ.get(SAVE_STEPS_ENV) else None
    with progress_bar(label, total=total_steps * examples_per_step) as advance:
        progress.advance = advance
        result = trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(Path(out_dir) / STATE_FILE))
    return result


def _last_checkpoint(out_dir) -> str | None:
    """The newest `checkpoint-N/` a launched stage's trainer saved in `out_dir` (selfalign.core.launcher)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out_dir)) if Path(out_dir).is_dir() else None


def loss_summary(trainer, result, digits: int = 4) -> dict:
    """`train_loss` (the run's mean), `first_loss` and `last_loss` (the first and last logged), `steps`."""
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    return {
        "train_loss": round(float(result.training_loss), digits),
        "first_loss": round(losses[0], digits) if losses else None,
        "last_loss": round(losses[-1], digits) if losses else None,
        "steps": int(trainer.state.global_step),
    }


@dataclass
class Fitted:
    """A trained model not yet saved: what `fit` returns. `save` writes it and returns the summary."""

    trainer: Any
    result: Any  # what trainer.train() returned
    tokenizer: Any
    base: str
    out_dir: Path
    settings: TrainSettings
    merge: bool
    started: float
    total_steps: int

    def save(self, losses: bool = True, digits: int = 4, **extra) -> dict:
        """Save the model (`save_trained`); return `{"model", train/first/last loss and steps (with
        `losses`), **extra, "lora", "wall_s"}`."""
        adapter = self.settings.lora and not self.merge
        if shards_parameters(self.trainer):
            dest = save_sharded(self.trainer, self.tokenizer, self.base, self.out_dir, adapter=adapter)
        else:
            dest = save_trained(self.trainer.model, self.tokenizer, self.base, self.out_dir, adapter=adapter)
        return {
            "model": str(dest.resolve()),
            **(loss_summary(self.trainer, self.result, digits) if losses else {}),
            **extra,
            "lora": self.settings.kind,
            "wall_s": round(time.time() - self.started, 1),
        }


@dataclass
class Trainee:
    """What `fit` trains: the model and tokenizer (loaded, in training mode) and the `base` reference
    they came from, the stage's `train:` settings and seed, the output folder (already made), whether
    the result is saved merged (the settings' `merge`, or true where an adapter base forces it), and
    when the trainer started (the summary's `wall_s` counts from it). `start_training` makes one for
    a causal LM, `selfalign.core.reward_training.prepare_for_training` for a scalar-head model (and
    says what it `started_from`); a trainer that loads its model its own way builds one itself."""

    base: str
    settings: TrainSettings
    out_dir: Path
    seed: int
    model: Any
    tokenizer: Any
    merge: bool
    started: float
    started_from: str | None = None  # reward trainers: "causal LM" (a fresh head) or "reward model"


def output_folder(out_dir: str | Path) -> Path:
    """`out_dir` as a Path, made if missing: where a trainer saves."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def start_training(base: str, out_dir: str | Path, settings: TrainSettings, seed: int,
                   started: float | None = None) -> Trainee:
    """A `Trainee` to fine-tune the causal LM `base` (`load_for_training`) into `out_dir`; `started`
    defaults to now."""
    started = time.time() if started is None else started
    out_dir = output_folder(out_dir)
    model, tokenizer = load_for_training(base, settings)
    return Trainee(base, settings, out_dir, seed, model, tokenizer, settings.merge, started)


def fit(trainee: Trainee, data, *, trainer_class, config_class, peft_task: str, describe: str, label: str,
        total_steps: int | None = None, batch_size: int | None = None, config_args: dict | None = None,
        trainer_args: dict | Callable[[Any], dict] | None = None, logging_steps: int | None = None,
        checkpointing: bool = True, count_tokens: bool = True) -> Fitted:
    """The one trainer skeleton: LoRA, arguments, trainer, progress bar. Every selfalign trainer runs here.

    `trainee` is what is trained (`Trainee`); `data` its training rows, a list (made a `datasets.Dataset`)
    or a dataset, handed to `trainer_class` as it is. LoRA (`settings.lora`, task type `peft_task`) is
    applied by the trainer where it takes a `peft_config` (TRL's), else here before the trainer is built.
    `config_class` (`TrainingArguments` or a TRL config) gets `common_training_args` and `config_args`;
    `trainer_args` are the trainer's own keywords, or a function of the (wrapped) model that returns
    them. `total_steps` and `batch_size` override what the settings imply (RLOO counts replies).
    `describe` opens the log line.
    """
    import inspect

    if isinstance(data, list):
        from datasets import Dataset

        data = Dataset.from_list(data)
    settings, out_dir, seed, model = trainee.settings, trainee.out_dir, trainee.seed, trainee.model
    examples = len(data)
    batch = batch_size or settings.batch_size
    if total_steps is None:
        total_steps = estimate_steps(examples, batch, settings.grad_accum, settings.epochs, settings.max_steps)
    peft = settings.peft_config(peft_task)
    own = {}
    if "peft_config" in inspect.signature(trainer_class.__init__).parameters:
        own["peft_config"] = peft
    elif peft is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft)
        model.train()
    args = config_class(**common_training_args(out_dir, settings, seed, total_steps, batch_size=batch_size,
                                               logging_steps=logging_steps, checkpointing=checkpointing,
                                               count_tokens=count_tokens), **(config_args or {}))
    extra = trainer_args(model) if callable(trainer_args) else (trainer_args or {})
    with quiet_datasets():
        trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=trainee.tokenizer,
                                **own, **extra)
    console.print(f"  {describe}, {total_steps} steps, lr {settings.lr:g}")
    result = run_trainer(trainer, label, total_steps, batch * settings.grad_accum, out_dir)
    return Fitted(trainer, result, trainee.tokenizer, trainee.base, out_dir, settings, trainee.merge,
                  trainee.started, total_steps)


def load_for_training(base: str, settings: TrainSettings):
    """(causal LM in training mode, tokenizer) to fine-tune from `base`; an adapter is merged first, so
    training continues from the adapted weights. A new adapter on an adapter is refused unless `merge`."""
    resolved = resolve(base)
    if resolved.kind == "peft" and settings.lora and not settings.merge:
        raise SelfAlignError(
            f"{base} is a LoRA adapter; a new adapter on top of it could not be loaded on its own",
            "train with merge: true, or train on a merged model (merge: true on the stage that made it)",
        )
    device, dtype = device_and_dtype()
    model, tokenizer = load_model(resolved, device=device, dtype=dtype)
    if _is_peft(model):
        model = model.merge_and_unload()  # train on top of the adapted weights
    model.train()
    return model, tokenizer


def write_examples(folder: Path, examples: list[dict]) -> None:
    """`folder/examples.jsonl`: exactly what a stage trains on, written whole or not at all."""
    tmp = Path(folder) / f"examples.jsonl.{os.getpid()}.tmp"  # one per process: a launch's ranks write it alike
    tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    tmp.replace(Path(folder) / "examples.jsonl")


def sft_train(base: str, examples: list[dict], out_dir: Path, settings: TrainSettings, seed: int = 0) -> dict:
    """Fine-tune `base` on prompt/completion `examples` (loss on the completion); save into `out_dir`.

    Returns `{"model": folder to load, "train_loss", "steps", "examples", "wall_s", ...}`.
    """
    from trl import SFTConfig, SFTTrainer

    trainee = start_training(base, out_dir, settings, seed)
    max_length = settings.max_length
    rows, cuts = tokenize_examples(trainee.tokenizer, examples, max_length)
    if not rows:
        raise SelfAlignError(f"no training example fits in max_length {max_length} ({len(examples)} given)",
                             "raise max_length or check the examples")
    if cuts["dropped_too_long"]:
        console.print(f"  [yellow]note:[/] {cuts['dropped_too_long']} examples dropped: their answer alone is longer "
                      f"than max_length {max_length}")
    with head_at_label_positions():  # the output layer only where the answer's labels are
        fitted = fit(trainee, rows, trainer_class=SFTTrainer, config_class=SFTConfig,
                     # padding-free (see the module's docstring); max_length is already enforced above, and
                     # TRL refuses one beside padding_free
                     config_args={"max_length": None, "padding_free": True},
                     peft_task="CAUSAL_LM", describe=f"fine-tuning {base} ({settings.kind}) on {len(rows)} examples",
                     label="training")
    return fitted.save(examples=len(rows), tokens=sum(len(r["input_ids"]) for r in rows), **cuts)


def model_output(folder: Path) -> str:
    """The model a later stage should load from a training stage's folder: its adapter or model."""
    folder = Path(folder)
    if (folder / ADAPTER_DIR / "adapter_config.json").exists():
        return str(folder / ADAPTER_DIR)
    if (folder / MODEL_DIR / "config.json").exists():
        return str(folder / MODEL_DIR)
    raise SelfAlignError(f"{folder} holds no trained model (no {ADAPTER_DIR}/ or {MODEL_DIR}/)",
                         "run the training stage first")
