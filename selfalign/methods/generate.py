"""`generate`: a model answers a prompt set; one row per (prompt, sample).

The simplest stage, and the shape of every generation stage after it: read prompts, skip the
ones whose rows are already in the store (a resumed run), generate the rest batch by batch, and
append each batch's rows the moment it is done.
"""

from __future__ import annotations

from pydantic import Field

from selfalign.core.engines import Sampling
from selfalign.core.progress import progress_bar
from selfalign.core.prompts import check_prompts_fit, load_prompts, prompt_file_text
from selfalign.core.recipe import StageConfig
from selfalign.core.store import RowStore, row_id
from selfalign.evals.common import resolve_system


class Config(StageConfig):
    stage: str = "generate"
    prompts: str = Field(..., description="prompt file (.txt or .jsonl) or builtin:NAME")
    system: str | None = Field(None, description="system prompt above each dialogue: text, a .txt file, hhh, builtin:NAME or builtin:FILE.yaml#KEY")
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
    store = RowStore(folder)
    if store.repaired_tail is not None:
        from selfalign.core.progress import console

        console.print(f"[yellow]note:[/] {store.path} ended in a half-written row (the run was killed); it was set aside")

    def sample_id(prompt, j: int) -> str:
        return row_id("generate", model, prompt.id, system, config.chat, sampling.model_dump(), j)

    done = store.done_ids()
    pending = [p for p in prompts if not all(sample_id(p, j) in done for j in range(sampling.n))]
    meta = ctx.provenance(config, model, sampling, system=system)
    tokens = 0
    if pending:
        engine = ctx.engine(model)
        requests = [p.as_request(system, config.chat) for p in pending]
        check_prompts_fit(engine, pending, requests, config.prompts)
        with progress_bar(config.label, total=len(pending), already_done=len(prompts) - len(pending)) as advance:
            for batch in engine.generate_iter(requests, sampling):
                rows = []
                for i, completions in batch:
                    p = pending[i]
                    for j, c in enumerate(completions):
                        rows.append({
                            "id": sample_id(p, j), "prompt_id": p.id, "prompt": p.text,
                            "messages": list(p.messages) if p.messages else None, "sample": j,
                            "completion": c.text, "finish_reason": c.finish_reason,
                            "completion_tokens": c.completion_tokens, "meta": meta,
                        })
                store.append(rows)
                batch_tokens = sum(c.completion_tokens for _, cs in batch for c in cs)
                tokens += batch_tokens
                advance(len(batch), batch_tokens)
    summary = {"prompts": len(prompts), "rows": len(store), "generated_now": len(pending), "tokens_now": tokens}
    store.mark_done(**summary)
    return summary
