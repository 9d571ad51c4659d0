"""`context_distill`: context distillation (Askell et al. 2021, the HHH laboratory, step 2).

A long prompt C (the HHH prompt: a preamble and 14 dialogues, ~5k tokens) makes a model a better
assistant but costs its context length on every request. Context distillation moves C into the
weights: the model *without* C is fine-tuned to predict, token by token, what the frozen model
*with* C predicts, minimising KL(p0(X | C) || p_theta(X)) over texts X.

What this stage does:

1. **X.** By default the teacher (the frozen model under C) answers a prompt set (`prompts`, with
   `sampling`), written row by row as a generation stage does; each X is then the plain dialogue
   `Human: <prompt>\\n\\nAssistant: <reply>`, exactly what the distilled model later reads without
   C. Or `text_file` gives the texts X (one a line, or JSONL with `text`).
2. **Teacher pass.** The teacher reads C + X once per X (C's KV cache computed once); per token
   of X its top-k log-probabilities, their ids and the log of the remaining mass are stored in
   safetensors shards under `teacher/` (see `selfalign.methods.hhh_lab.distill`). A killed pass resumes by shard.
3. **Training.** The student (the stage's `model`) reads X alone and is trained on the KL over the
   teacher's top-k plus one "rest" bucket, averaged over every token of X (`tokens: all`) or the
   reply's only (`tokens: reply`); transformers' `Trainer`, LoRA or full.

Outputs: `rows.jsonl` (the teacher's samples), `teacher/` (manifest + shards), `adapter/` or
`model/` and `trainer_state.json`; the done-marker's `model` makes `@context_distill` a model
reference for later stages, and it records the mean KL before and after training on (up to
`kl_eval_examples` of) the training texts, read from the stored targets.

Defaults: the HHH prompt as C; the teacher is the stage's own model (a model distilled into
itself, as in the paper); k 64 stored in float16 (about 400 bytes a token; this project's choice);
LoRA r 16, alpha 16, dropout 0.05 on q/k/v/o, lr 4e-4, 1 epoch, 512 tokens: the project's LoRA
settings (from Self-Align); sampling temperature 1.0, top-p 0.95, 128 new tokens (this project's
choice: samples close to the prompted model's own distribution).

Simplifications: the loss is the KL between the two distributions coarsened to the teacher's
top-k tokens and one bucket for the rest, a lower bound on the exact KL that tightens as k grows
(exact at k = vocabulary size). The choice of X (the prompted model's own replies to a prompt set)
is this project's; the paper's corpus is not reproduced. An X longer than `train.max_length` tokens is cut
from the right (each kept position still has its full left context). X and the teacher pass use
the plain `Human:/Assistant:` format whatever the engine's `chat_format`. A killed run keeps its
samples and teacher shards and trains again from the start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from selfalign.core.chat import ASSISTANT_TAG, render_plain
from selfalign.core.engines import Sampling
from selfalign.core.errors import SelfAlignError
from selfalign.core.generation import Job, generate_rows, open_rows
from selfalign.core.inputs import read_text
from selfalign.core.progress import console
from selfalign.core.prompts import prompt_file_text
from selfalign.core.recipe import StageConfig
from selfalign.core.store import RowStore, read_jsonl, row_id
from selfalign.core.training import TrainSettings
from selfalign.evals.common import resolve_system

TEACHER_DIR = "teacher"


class Config(StageConfig):
    stage: str = "context_distill"
    teacher: str | None = Field(None,
                                description="the frozen model that reads the context (default: the stage's model)")
    system: str = Field("hhh",
                        description="the context C: hhh, builtin:NAME, builtin:FILE.yaml#KEY, a .txt file or the text")
    prompts: str = Field("builtin:quickstart",
                         description="what the teacher answers to make X: @<stage> or a prompt file")
    text_file: str | None = Field(None,
                                  description="X from a file instead: .txt (one text a line) or .jsonl with `text`")
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.95, max_new_tokens=128),
                               description="how the teacher samples its replies (n: replies per prompt)")
    max_prompts: int | None = Field(None, ge=1, description="use at most N prompts (or texts of text_file)")
    k: int = Field(64, ge=1, description="teacher log-probs stored per token (plus the remaining mass)")
    topk_dtype: Literal["float16", "float32"] = Field("float16", description="storage type of the stored log-probs")
    tokens: Literal["all", "reply"] = Field("all",
                                            description="average the KL over all tokens of X or the reply's only")
    teacher_batch_tokens: int = Field(4096, ge=64,
                                      description="tokens of X per teacher forward pass (besides the context)")
    shard_examples: int = Field(64, ge=1,
                                description="texts per stored shard (the unit a killed teacher pass resumes by)")
    train: TrainSettings = Field(default_factory=TrainSettings,
                                 description="how the student is trained (not published: LoRA r 16, lr 4e-4 (~1e-5 for "
                                             "full fine-tuning), 1 epoch); max_length: tokens of X, the student's "
                                             "input, a longer X cut from the right")
    kl_eval_examples: int = Field(256, ge=1, description="texts the KL before/after training is measured on")

    def human_inputs(self) -> list[tuple[str, str]]:
        named = self.system == "hhh" or self.system.startswith("builtin:")
        out = [(self.system if named else f"{self.label}.system", resolve_system(self.system) or "")]
        if self.text_file is None and not self.prompts.startswith("@"):
            out.append((self.prompts, prompt_file_text(self.prompts)))
        return out


# -- X -----------------------------------------------------------------------------------------------
def dialogue_x(prompt: str, reply: str) -> tuple[str, int]:
    """The text X a sampled reply becomes, and where its reply starts (a character offset)."""
    head = render_plain([{"role": "user", "content": prompt}])
    return render_plain([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                        add_generation_prompt=False), len(head)


def reply_offset(text: str) -> int:
    """Where the last assistant turn's reply starts in a given text, or 0 (all of it) if none."""
    at = text.rfind(ASSISTANT_TAG)
    return at + len(ASSISTANT_TAG) if at >= 0 else 0


def texts_from_file(ref: str) -> list[dict]:
    """X from a .txt file (one text a non-blank line) or JSONL (`text`, optional `id`)."""
    path = Path(ref).expanduser()
    if not path.is_file():
        raise SelfAlignError(f"text_file: {path} does not exist",
                             "pass a .txt (one text a line) or .jsonl file with `text`")
    if path.suffix.lower() in (".jsonl", ".json"):
        out = []
        for i, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SelfAlignError(f"{path}: row {i}: text_file rows need a `text` string")
            out.append((str(row.get("id") or row_id("text", row["text"])), row["text"]))
    else:
        out = [(row_id("text", line), line) for line in read_text(path, "text_file").splitlines()
               if line.strip()]
    seen: set[str] = set()
    texts = [{"id": rid, "text": t, "reply_char": reply_offset(t)} for rid, t in out
             if t.strip() and not (rid in seen or seen.add(rid))]
    if not texts:
        raise SelfAlignError(f"text_file: {path} holds no texts")
    return texts


def sample_x(ctx, config: Config, teacher: str, system: str, folder: Path) -> list[dict]:
    """The teacher's replies under the context, written as they come; X = the plain dialogue."""
    prompts = ctx.stage_prompts(config)
    sampling = config.sampling.model_copy(update={"seed": config.sampling.seed or ctx.recipe.seed})
    store = open_rows(folder)

    def build_row(job: Job, j: int, c) -> dict:
        reply = c.text.strip()
        text, reply_char = dialogue_x(job.data["prompt"], reply) if reply else ("", 0)
        return {"prompt_id": job.key, "prompt": job.data["prompt"], "sample": j, "completion": c.text,
                "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens, "text": text,
                "reply_char": reply_char}

    jobs = [Job(pid, [{"role": "system", "content": system}, {"role": "user", "content": p}], {"prompt": p})
            for pid, p in prompts]
    rows = generate_rows(ctx, store, stage="context_distill", label=f"{config.label}: teacher samples", model=teacher,
                         sampling=sampling, jobs=jobs, build_row=build_row,
                         meta=ctx.provenance(config, teacher, sampling, system=config.system)).rows
    return [{"id": r["id"], "text": r["text"], "reply_char": r["reply_char"]} for r in rows if r["text"]]


# -- the teacher pass --------------------------------------------------------------------------------
def _teacher_model(ctx, teacher: str):
    """(model, tokenizer, loaded_here): the run's hf engine's model if it has one, else loaded now."""
    engine = ctx.engines.get((teacher, "hf"))
    if engine is not None and getattr(engine, "model", None) is not None:
        return engine.model, engine.tokenizer, False
    from selfalign.core.models import load_model

    ctx.free_accelerator()  # a vLLM engine holds the GPU
    eng = ctx.recipe.engine
    device, dtype = (eng.device, eng.dtype) if eng.name == "hf" else ("auto", "auto")
    model, tok = load_model(teacher, device=device, dtype=dtype, trust_remote_code=eng.trust_remote_code)
    return model, tok, True


def run(ctx, config: Config, folder) -> dict:
    from selfalign.core.models import load_tokenizer, resolve
    from selfalign.methods.hhh_lab import distill

    folder = Path(folder)
    base = ctx.model_for(config)
    teacher = ctx.model_for(config, config.teacher)
    system = resolve_system(config.system)
    if not system:
        raise SelfAlignError(f"{config.label}.system: context distillation needs a context C (got an empty one)")
    store = RowStore(folder)
    if config.text_file:
        examples = texts_from_file(config.text_file)
        if cap := ctx.max_prompts(config.max_prompts):
            examples = examples[:cap]
        source = config.text_file
    else:
        examples = sample_x(ctx, config, teacher, system, folder)
        source = f"teacher samples on {config.prompts}"
    if not examples:
        raise SelfAlignError(f"{config.label}: no text X to distil on (every reply was empty)", f"look at {store.path}")

    key = distill.teacher_key(teacher, system, config.k, config.topk_dtype, config.train.max_length)
    teacher_dir = folder / TEACHER_DIR
    if set(e["id"] for e in examples) - distill.prepare_teacher_dir(teacher_dir, key):
        model, tok, loaded_here = _teacher_model(ctx, teacher)
        console.print(f"  the teacher {teacher} reads the context ({len(system)} characters) and each of "
                      f"{len(examples)} texts; top-{config.k} log-probs stored per token", markup=False, emoji=False)
        distill.teacher_pass(model, tok, system, examples, teacher_dir, key, batch_tokens=config.teacher_batch_tokens,
                             shard_examples=config.shard_examples)
        if loaded_here:
            del model
    tok = load_tokenizer(resolve(teacher))
    context_tokens = len(distill.context_ids(tok, system, distill.special_prefix(tok)))
    ids = [e["id"] for e in examples]
    stats = distill.TeacherTargets(teacher_dir, ids).stats(reply_only=config.tokens == "reply")
    ctx.free_accelerator()
    result = distill.distill_train(base, teacher_dir, folder, config.train, ctx.recipe.seed,
                                   reply_only=config.tokens == "reply",
                                   kl_eval_examples=config.kl_eval_examples, ids=ids)
    named = config.system if len(config.system) <= 80 else config.system[:77] + "..."
    summary = {**result, "base": base, "teacher": teacher, "system": named, "context_tokens": context_tokens,
               "k": config.k, "topk_dtype": config.topk_dtype, "tokens": config.tokens, "x_source": source, **stats}
    store.mark_done(**summary)
    return summary


# -- report --------------------------------------------------------------------------------------------
def report_section(stage: dict):
    """Context distillation's numbers: the teacher's setting and the KL before and after training."""
    from selfalign.core.report_api import Bold, Chart, Facts, Muted, Section, Series, Text

    folder = stage.get("folder")
    summary = stage.get("summary") or {}
    if not summary and folder is not None and (Path(folder) / "_done.json").exists():
        summary = json.loads((Path(folder) / "_done.json").read_text())
    if "kl_before" not in summary:
        return None
    before, after = summary["kl_before"], summary["kl_after"]
    facts = [("teacher", summary.get("teacher")),
             ("context", f"{summary.get('system')} ({summary.get('context_tokens')} tokens)"),
             ("stored per token", f"top-{summary.get('k')} ({summary.get('topk_dtype')}) + rest"),
             ("teacher mass in top-k", summary.get("teacher_topk_mass")), ("texts X", summary.get("texts")),
             ("target tokens", f"{summary.get('target_tokens')} ({summary.get('tokens')})"),
             ("X from", summary.get("x_source")), ("trained", f"{summary.get('lora')}, {summary.get('steps')} steps")]
    change = f"{100 * (after - before) / before:+.1f}%" if before else ""
    return Section(f"context-distill-{stage.get('label')}", f"Context distillation: {stage.get('label')}", [
        Facts(facts),
        Text([f"Mean truncated KL on {summary.get('kl_examples')} training texts: ", Bold(f"{before:.4f}"), " before, ",
              Bold(f"{after:.4f}"), f" after training ({change}). ",
              Muted("The KL over the teacher's top-k tokens plus one bucket for the rest: a lower bound on "
                    "the exact KL.")]),
        Chart("barh", [Series("after", [], [after], color=2), Series("before", [], [before], color=3)],
              "KL before and after context distillation",
              xlabel="mean KL(teacher with C ‖ student without C), nats/token", size=(5, 2.2), grid=False)])
