"""`generate`: a model answers a prompt set; one row per (prompt, sample).

The simplest stage, and the shape of every generation stage after it: one job per prompt, handed
to the generation driver (`selfalign.core.generation`), which skips what a resumed run already
wrote and appends the rest batch by batch.
"""

from __future__ import annotations

from pydantic import Field

from selfalign.core.engines import Sampling
from selfalign.core.generation import Job, generate_rows, open_rows
from selfalign.core.prompts import check_prompts_fit, load_prompts, prompt_file_text
from selfalign.core.recipe import StageConfig
from selfalign.evals.common import resolve_system


class Config(StageConfig):
    stage: str = "generate"
    prompts: str = Field(..., description="prompt file (.txt or .jsonl) or builtin:NAME")
    system: str | None = Field(None,
                               description="system prompt above each dialogue: text, a .txt file, hhh, builtin:NAME or "
                                           "builtin:FILE.yaml#KEY")
    chat: bool = Field(True, description="wrap each prompt as the user's turn of a dialogue (else: raw text)")
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.9, max_new_tokens=128))
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts")

    def human_inputs(self) -> list[tuple[str, str]]:
        out = [(self.prompts, prompt_file_text(self.prompts))]
        return out + ([(f"{self.label}.system", resolve_system(self.system))] if self.system else [])


def run(ctx, config: Config, folder) -> dict:
    model = ctx.model_for(config)
    prompts = load_prompts(config.prompts)
    if cap := ctx.max_prompts(config.max_prompts):
        prompts = prompts[:cap]
    sampling = config.sampling.model_copy(update={"seed": config.sampling.seed or ctx.recipe.seed})
    system = resolve_system(config.system)
    store = open_rows(folder)

    def build_row(job: Job, j: int, c) -> dict:
        p = job.data["prompt"]
        return {"prompt_id": p.id, "prompt": p.text, "messages": list(p.messages) if p.messages else None, "sample": j,
                "completion": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens,
                # generated past the kept text (a stop string's tokens, the end-of-text token): waste, shown apart
                "discarded_tokens": c.discarded_tokens}

    jobs = [Job(p.id, p.as_request(system, config.chat), {"prompt": p}) for p in prompts]
    made = generate_rows(ctx, store, stage="generate", label=config.label, model=model, sampling=sampling, jobs=jobs,
                         build_row=build_row, meta=ctx.provenance(config, model, sampling, system=system),
                         check=lambda engine, pending: check_prompts_fit(
                             engine, [job.data["prompt"] for job in pending], [job.request for job in pending],
                             config.prompts))
    summary = {"prompts": len(prompts), "rows": len(store), "generated_now": made.made, "tokens_now": made.tokens}
    store.mark_done(**summary)
    return summary
