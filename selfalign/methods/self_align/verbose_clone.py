"""`verbose_clone`: Verbose Cloning (Self-Align, Sun et al. 2023, §3.4).

The principle-engraved model tends to answer briefly. Prompted with a short "be detailed and
thorough" system prompt it writes fuller answers; this stage has it answer every prompt that way
(temperature 0.3, top-p 0.7, up to 512 new tokens, a repetition penalty) and then fine-tunes the
*base* model on those answers without the verbose prompt, under the same short system prompt the
engraved model was trained with: context distillation by sampling. Max length 768.

Simplifications: the paper's n-gram repetition penalties are a single multiplicative repetition
penalty (1.1, what transformers and vLLM offer); empty answers are dropped, nothing else.
"""

from __future__ import annotations

from pydantic import Field

from selfalign.core.assets_io import asset_text, yaml_key
from selfalign.core.engines import Sampling
from selfalign.core.errors import SelfAlignError
from selfalign.core.generation import Job, generate_rows, open_rows
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig
from selfalign.core.supervised import training_example
from selfalign.core.training import TrainSettings


class Config(StageConfig):
    stage: str = "verbose_clone"
    teacher: str = Field("@engrave", description="the model that writes the verbose answers (the engraved model)")
    prompts: str = Field("@self_instruct", description="@<stage> or a prompt file: what the teacher answers")
    system_prompts: str = "builtin:self_align/system_prompts.yaml"
    sampling: Sampling = Field(default_factory=lambda: Sampling(
        temperature=0.3, top_p=0.7, max_new_tokens=512, repetition_penalty=1.1))
    train: TrainSettings = Field(default_factory=lambda: TrainSettings(max_length=768),
                                 description="how the base model is fine-tuned on the verbose answers (the paper's: "
                                             "as principle engraving, LoRA r 16, lr 4e-4, 1 epoch, max length 768)")
    max_prompts: int | None = Field(None, ge=1)

    def human_inputs(self) -> list[tuple[str, str]]:
        return [(self.system_prompts, asset_text(self.system_prompts))]


def run(ctx, config: Config, folder) -> dict:
    from selfalign.core.training import sft_train

    base = ctx.model_for(config)
    teacher = ctx.model_for(config, config.teacher)
    verbose = yaml_key(config.system_prompts, "verbose")
    short = yaml_key(config.system_prompts, "engraved")
    prompts = ctx.stage_prompts(config)
    sampling = config.sampling.model_copy(update={"n": 1, "seed": config.sampling.seed or ctx.recipe.seed})
    store = open_rows(folder)
    jobs = [Job(pid, [{"role": "system", "content": verbose}, {"role": "user", "content": p}], {"prompt": p})
            for pid, p in prompts]
    made = generate_rows(ctx, store, stage="verbose_clone", label=f"{config.label}: verbose answers", model=teacher,
                         sampling=sampling, jobs=jobs, meta=ctx.provenance(config, teacher, sampling),
                         build_row=lambda job, _, c: {"prompt_id": job.key, "prompt": job.data["prompt"],
                                                      "answer": c.text.strip(),
                                                      "completion": c.text, "finish_reason": c.finish_reason})
    rows = [r for r in made.rows if r["answer"]]
    if not rows:
        raise SelfAlignError(f"{config.label}: the teacher wrote no usable answers", f"look at {store.path}")
    # the same training text as principle engraving; the trainer appends the EOS token
    examples = [training_example(short, r["prompt"], r["answer"], eos="") for r in rows]
    console.print(f"  fine-tuning {base} on {len(examples)} verbose answers, without the verbose prompt")
    ctx.free_accelerator()
    result = sft_train(base, examples, folder / "train", config.train, ctx.recipe.seed)
    summary = {"model": result["model"], "answers": len(rows), "train_loss": result.get("train_loss"),
               "steps": result.get("steps"), "teacher": teacher}
    store.mark_done(**summary)
    return summary
