"""The one resumable generation driver every generation stage runs on.

A stage says *what* to generate: a list of `Job`s (an identity, the request the engine reads and
any data its rows need) and a row builder. The driver owns the rest, so that every stage resumes
the same way:

- row ids: a hash of the stage kind, the model, the engine and its chat format, the sampling (its
  seed included), the request as sent (the rendered context), the job's key, anything else the
  stage says defines the row, and the sample index. A rerun with another model, other sampling or
  another context therefore never reuses a row, and the same job is never generated twice;
- lazy engine loading: the model is loaded only when some job has no rows yet;
- batching: rows are appended (flushed, fsynced) batch by batch as the engine finishes them, or
  chunk by chunk for stages whose generation is several engine calls per job (`produce`);
- the notice for a half-written last row set aside by the store, and a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfalign.core.engines import Engine, Sampling
from selfalign.core.progress import console, progress_bar
from selfalign.core.store import ROWS_FILE, RowStore, row_id


@dataclass
class Job:
    """One input of a generation stage: `key` identifies it within the stage (a prompt id, a
    (step, round, request) tuple, ...), `request` is what the engine reads (a text or a chat), and
    `data` carries whatever the row builder needs."""

    key: Any
    request: Any
    data: dict = field(default_factory=dict)


@dataclass
class Generated:
    """What a `generate_rows` call left in the store: every job's rows (in job order, each job's
    samples in order; a job the engine never finished has none), and what this call generated."""

    per_job: list[list[dict]]
    made: int = 0
    tokens: int = 0

    @property
    def rows(self) -> list[dict]:
        return [r for rows in self.per_job for r in rows]


def open_rows(folder: str | Path, filename: str = ROWS_FILE) -> RowStore:
    """The stage's row store; says so when a half-written last row (a killed run) was set aside."""
    store = RowStore(folder, filename)
    if store.repaired_tail is not None:
        console.print(f"[yellow]note:[/] {store.path} ended in a half-written row (the run was killed); "
                      "it was set aside and is made again")
    return store


def job_ids(ctx, stage: str, model: str, sampling: Sampling, job: Job, samples: int, id_extra: Any = None) -> list[str]:
    """The ids of a job's rows: everything that decides what the engine writes is in them."""
    engine = ctx.recipe.engine
    return [row_id(stage, ctx.model_key(model), engine.name, engine.chat_format, sampling.model_dump(), job.request,
                   job.key, id_extra, j)
            for j in range(samples)]


# `produce(engine, jobs) -> (outputs per job, tokens)`: for stages that need several engine calls per job
Produce = Callable[[Engine, list[Job]], tuple[list[list[Any]], int]]


def generate_rows(ctx, store: RowStore, *, stage: str, label: str, model: str, sampling: Sampling, jobs: Sequence[Job],
                  build_row: Callable[[Job, int, Any], dict], meta: dict | None = None, id_extra: Any = None,
                  produce: Produce | None = None, chunk: int = 64, samples: int | None = None,
                  check: Callable[[Engine, list[Job]], None] | None = None) -> Generated:
    """Generate every job that has no rows in `store` yet and append its rows as they come.

    Without `produce`, each job's request goes to `engine.generate_iter` and each of its
    `sampling.n` completions becomes one row, `{"id", **build_row(job, j, completion), "meta"}`.
    With `produce`, jobs go `chunk` at a time to `produce(engine, jobs)`, which returns one list of
    `samples` (default 1) outputs per job; `build_row` turns each output into a row. `check(engine,
    pending jobs)` runs once the engine is loaded, before anything is generated (e.g. a length check).
    """
    samples = samples or (sampling.n if produce is None else 1)
    ids = [job_ids(ctx, stage, model, sampling, job, samples, id_extra) for job in jobs]
    pending = [i for i, job_rows in enumerate(ids) if not all(rid in store for rid in job_rows)]
    made = tokens = 0

    def rows_of(i: int, outputs: Sequence[Any]) -> list[dict]:
        out = []
        for j, output in enumerate(outputs):
            row = {"id": ids[i][j], **build_row(jobs[i], j, output)}
            if meta is not None:
                row["meta"] = meta
            out.append(row)
        return out

    from selfalign.core import distributed, ranks

    stage_config = getattr(ctx, "current", None)
    if pending and ranks.is_follower():  # a launched training stage's other processes: the main one generates
        ranks.wait_for_rows(store, [rid for i in pending for rid in ids[i]])
    elif pending and stage_config is not None and distributed.wants_ray(stage_config):
        with progress_bar(label, total=len(pending), already_done=len(jobs) - len(pending)) as advance:
            made, tokens = distributed.generate_on_workers(
                ctx, store, stage_config, model=model, sampling=sampling, jobs=jobs, ids=ids, pending=pending,
                rows_of=rows_of, produce=produce, chunk=chunk, check=check, progress=advance)
    elif pending:
        engine = ctx.engine(model)
        if check is not None:
            check(engine, [jobs[i] for i in pending])
        with progress_bar(label, total=len(pending), already_done=len(jobs) - len(pending)) as advance:
            if produce is None:
                for batch in engine.generate_iter([jobs[i].request for i in pending], sampling):
                    store.append([r for k, completions in batch for r in rows_of(pending[k], completions)])
                    batch_tokens = sum(c.completion_tokens for _, cs in batch for c in cs)
                    made, tokens = made + len(batch), tokens + batch_tokens
                    advance(len(batch), batch_tokens)
            else:
                for start in range(0, len(pending), chunk):
                    part = pending[start:start + chunk]
                    outputs, chunk_tokens = produce(engine, [jobs[i] for i in part])
                    store.append([r for i, outs in zip(part, outputs, strict=True) for r in rows_of(i, outs)])
                    made, tokens = made + len(part), tokens + chunk_tokens
                    advance(len(part), chunk_tokens)
    if not ranks.is_follower():
        store.merge_shards()  # complete or not: readers of rows.jsonl see every row written so far
    by_id = {r["id"]: r for r in store}
    return Generated([[by_id[rid] for rid in job_rows if rid in by_id] for job_rows in ids], made, tokens)
