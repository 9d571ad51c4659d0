"""`engrave`: Principle Engraving (Self-Align, Sun et al. 2023, §3.3).

The answers the base model wrote under the long principle-driven prompt (16 principles, 5
exemplars, internal thoughts) are distilled back into the base model *without* that prompt: the
model is fine-tuned on (prompt → answer) under a short system prompt only, so the principles are
"engraved" into its weights and it no longer needs them in context.

Each training example is the plain transcript

    <system prompt>\\n\\nHuman: <prompt>\\n\\nAssistant:   →   " <answer><eos>"

with the loss on the answer only. Paper settings, the defaults here: LoRA on q/k/v/o, r 16,
alpha 16, dropout 0.05; lr 4e-4, 1 epoch, warmup then linear decay; max length 512. The model
trained is the stage's model (`model:` or the recipe's), i.e. the *base* model, not the model
that wrote the answers under the principle prompt (in the paper they are the same weights).

Input: `data` names an earlier stage (its `rows.jsonl`) or a JSONL file; rows need `prompt` and
`answer`, and a row with `kept: false` (rejected by the self-alignment filters) is skipped.
Output: `examples.jsonl` (exactly what was trained on), `adapter/` (or `model/` with `merge: true`
or `lora: false`), `trainer_state.json` (losses), and the done-marker whose `model` is the path a
later stage loads.

Simplifications: the warmup fraction (3%) and batch size (4) are not published for this step and
are fields of `train:`; a prompt longer than `train.max_length` loses tokens from the left of the rendered text
(system prompt first), an answer that alone is too long is dropped (see `selfalign.core.training`);
a killed run trains again from the start (training is minutes on CPU-sized data, and a half-trained
adapter is never marked done).
"""

from __future__ import annotations

from pydantic import Field

from selfalign.core.assets_io import yaml_key
from selfalign.core.models import load_tokenizer, resolve
from selfalign.core.recipe import StageConfig
from selfalign.core.store import row_id
from selfalign.core.supervised import kept_rows, train_on_examples, training_example, training_rows
from selfalign.core.training import TrainSettings


class Config(StageConfig):
    stage: str = "engrave"
    data: str = Field(...,
                      description="an earlier stage's name (its rows.jsonl) or a JSONL file with "
                                  "prompt, answer, [kept]")
    system: str = Field("builtin:self_align/system_prompts.yaml#engraved",
                        description="system prompt: FILE.yaml#KEY (builtin: or a path) or the text itself")
    train: TrainSettings = Field(default_factory=TrainSettings,
                                 description="how the base model is fine-tuned (the paper's: LoRA r 16 on q/k/v/o, "
                                             "lr 4e-4, 1 epoch, max length 512 tokens of system + prompt + answer)")
    max_examples: int | None = Field(None, ge=1, description="train on at most the first N usable rows")

    def human_inputs(self) -> list[tuple[str, str]]:
        source = self.system if _is_yaml_key(self.system) else f"{self.label}.system"
        return [(source, system_text(self.system))]


def _is_yaml_key(ref: str) -> bool:
    path, _, key = ref.rpartition("#")
    return bool(key) and path.lower().endswith((".yaml", ".yml")) and "\n" not in ref


def system_text(ref: str) -> str:
    """`builtin:self_align/system_prompts.yaml#engraved`, `my.yaml#key`, or the text itself."""
    if not _is_yaml_key(ref):
        return ref.strip()
    path_ref, _, key = ref.rpartition("#")
    return yaml_key(path_ref, key)


def usable_rows(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows with a prompt and an answer that were not rejected (`kept: false`); counts of the rest."""
    return kept_rows(rows, lambda r: bool(str(r.get("prompt") or "").strip() and str(r.get("answer") or "").strip()),
                     "no prompt or answer")


def run(ctx, config: Config, folder) -> dict:
    base = ctx.model_for(config)
    system = system_text(config.system)
    source, rows, skipped = training_rows(ctx, config.data, usable_rows, config.max_examples,
                                          "no usable rows to train on (rows need prompt and "
                                          "answer, and kept not false)")
    eos = load_tokenizer(resolve(base)).eos_token or ""
    examples = [{"id": r.get("id") or row_id("engrave", r["prompt"], r["answer"]),
                 **training_example(system, r["prompt"], r["answer"], eos)} for r in rows]
    note = (f"  {len(examples)} examples from {source} ({skipped['not kept']} not kept, "
            f"{skipped['no prompt or answer']} empty)")
    return train_on_examples(ctx, config, examples, folder, note, data=str(source), skipped=skipped)
