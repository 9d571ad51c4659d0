"""Generation stages over Ray workers (`workers: N` or `ray_address:` on a stage; `pip install 'selfalign[ray]'`).

    - stage: self_align
      workers: 4                      # 4 Ray actors, each with the recipe's engine and model
      ray_address: auto               # optional: join a running cluster (`ray start --head` ...)

The one generation driver (`selfalign.core.generation.generate_rows`) computes every job's row ids
and which jobs have no rows yet, as always. Here those pending jobs are dealt to the workers by row
id (a job's first row id, as a number, modulo N), so which worker makes a row depends on the row
alone. Each worker is a Ray actor holding one engine (the hf engine on CPU or a GPU, or vLLM with
its own tensor/pipeline parallelism inside); it works through its share chunk by chunk and hands
each chunk's completions back. The driver turns them into rows exactly as for one process and
appends worker K's rows to `rows.shard-K.jsonl` as they arrive. Rows travel back to the driver
rather than being written by the workers themselves, so the nodes of a cluster need no shared
filesystem (only the models); the shard files keep each worker's appends apart.

Resume and exactly-once are the row store's: it reads the main file and every shard as one, so a
rerun (with any number of workers, or none) skips every row already written. A worker that dies
part-way stops the stage with an error once the other workers' chunks in flight are written; run
the same command again to finish. When a stage's generation is complete its shards are merged into
`rows.jsonl`. Seeds come from the sampling seed, the prompt and the sample index, never from a
worker's position in the work, so N workers write the rows one worker writes.

There is no scheduler here: the split is static (by row id) and Ray places the actors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selfalign.core.errors import SelfAlignError

INSTALL = "pip install 'selfalign[ray]'"


def wants_ray(config) -> bool:
    """Whether a stage asked for Ray workers: `workers` above 1, or a cluster address."""
    return (getattr(config, "workers", None) or 1) > 1 or bool(getattr(config, "ray_address", None))


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def check_workers(recipe, stages: dict[str, Any], source: str) -> None:
    """At load time: `workers`/`ray_address` only on stages that run the generation driver, and only with Ray
    installed."""
    for i, config in enumerate(recipe.stages):
        if not wants_ray(config):
            continue
        field = "workers" if (config.workers or 1) > 1 else "ray_address"
        value = config.workers if field == "workers" else config.ray_address
        module = stages.get(config.stage)
        if not uses_generation_driver(module):
            raise SelfAlignError(f"{source}: stages[{i}].{field}: {config.stage!r} is not a generation stage, so it "
                                 "cannot be spread over Ray workers",
                                 "training stages scale with the recipe's `launcher:` block (accelerate launch)")
        if not ray_installed():
            raise SelfAlignError(f"{source}: stages[{i}].{field}: {value} needs Ray, which is not installed: {INSTALL}")


def uses_generation_driver(module) -> bool:
    """A stage module runs the one generation driver when it imports `generate_rows` (every generation stage does)."""
    driver = getattr(module, "generate_rows", None)  # by name: this module is imported by the driver itself
    return getattr(driver, "__module__", None) == "selfalign.core.generation"


def split_by_row_id(pending: Sequence[int], ids: Sequence[Sequence[str]], workers: int) -> list[list[int]]:
    """Worker k's share of the pending jobs: those whose first row id, as a number, is k modulo `workers`."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    for i in pending:
        shares[int(ids[i][0], 16) % workers].append(i)
    return shares


def _ray():
    try:
        import ray
    except ImportError:
        raise SelfAlignError(f"workers: this stage asks for Ray workers, but Ray is not installed: {INSTALL}") from None
    return ray


def _connect(ray, address: str | None) -> None:
    if ray.is_initialized():
        return
    # no address: a local cluster on this machine's CPUs and GPUs, whose workers inherit this process's
    # environment (SELFALIGN_CACHE, HF_HOME, ...); "auto" or host:port joins a running one, whose nodes
    # bring their own (set it where `ray start` runs)
    ray.init(address=address or None, include_dashboard=False)


def _worker_resources(ray, engine) -> dict:
    """One CPU for an hf worker on the CPU; one GPU for it where the cluster has GPUs (unless the recipe says
    device: cpu); a vLLM worker gets the GPUs its tensor x pipeline parallelism spans."""
    if engine.name == "vllm":
        return {"num_cpus": 1, "num_gpus": (engine.tensor_parallel_size or 1) * (engine.pipeline_parallel_size or 1)}
    gpus = ray.cluster_resources().get("GPU", 0)
    if engine.name == "hf" and gpus and not engine.device.startswith("cpu"):
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": 1}


def _worker_class(ray):
    class GenerationWorker:
        """One engine with one model, in a Ray actor."""

        def __init__(self, engine: str, model: str, options: dict):
            from selfalign.core.engines import make_engine

            self.engine = make_engine(engine, model, **options)

        def check(self, check, jobs):
            check(self.engine, jobs)

        def generate(self, requests, sampling):
            out: list = [None] * len(requests)
            for batch in self.engine.generate_iter(requests, sampling):
                for i, completions in batch:
                    out[i] = completions
            return out

        def produce(self, produce, jobs):
            return produce(self.engine, jobs)

        def pid(self) -> int:
            return os.getpid()

    return ray.remote(max_restarts=0, max_task_retries=0)(GenerationWorker)


def worker_name(label: str, k: int) -> str:
    """The Ray actor name of a stage's worker k (tests and operators find it with `ray.get_actor`)."""
    return f"selfalign:{label}:{k}"


def _cause(exc: BaseException) -> BaseException:
    """The error a Ray task raised, unwrapped (a SelfAlignError from a worker is the user's to read)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def generate_on_workers(ctx, store, config, *, model: str, sampling, jobs: Sequence, ids: Sequence[Sequence[str]],
                        pending: Sequence[int], rows_of: Callable[[int, Sequence[Any]], list[dict]], produce=None,
                        chunk: int = 64, check=None, progress=None) -> tuple[int, int]:
    """Generate the `pending` jobs on `config.workers` Ray actors; worker k's rows go to shard k of `store`.
    Returns (jobs made, tokens). `progress(jobs, tokens)` is called as chunks come back."""
    from selfalign.core.models import resolve

    ray = _ray()
    _connect(ray, getattr(config, "ray_address", None))
    n = max(1, config.workers or 1)
    shares = split_by_row_id(pending, ids, n)
    engine = ctx.recipe.engine
    resolve(model)  # build or convert a cached model once, here, not in N workers at once
    path = Path(model).expanduser()
    load = str(path.resolve()) if path.exists() else model  # workers may start in another folder
    size = chunk if produce is not None else (engine.batch_size or 16)
    queues = {k: [share[s:s + size] for s in range(0, len(share), size)] for k, share in enumerate(shares) if share}
    worker_cls = _worker_class(ray)
    resources = _worker_resources(ray, engine)
    workers = {k: worker_cls.options(name=worker_name(config.label, k), **resources)
               .remote(engine.name, load, engine.options())
               for k in queues}
    from selfalign.core.progress import console

    console.print(f"  {len(pending)} jobs over {len(workers)} Ray workers "
                  f"({', '.join(f'{len(shares[k])}' for k in workers)} each)")
    inflight: dict = {}
    made = tokens = 0
    failure: tuple[int, BaseException] | None = None

    def submit(k: int) -> None:
        if not queues[k]:
            return
        part = queues[k].pop(0)
        if produce is not None:
            ref = workers[k].produce.remote(produce, [jobs[i] for i in part])
        else:
            ref = workers[k].generate.remote([jobs[i].request for i in part], sampling)
        inflight[ref] = (k, part)

    try:
        if check is not None:  # e.g. prompts that do not fit the context: the user's error, as in one process
            try:
                ray.get([workers[k].check.remote(check, [jobs[i] for i in shares[k]]) for k in workers])
            except Exception as exc:  # noqa: BLE001
                raise _cause(exc) from None
        for k in workers:
            submit(k)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            k, part = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a dead actor or a task's error; sorted out below
                cause = _cause(exc)
                if isinstance(cause, SelfAlignError):
                    raise cause from None
                failure = failure or (k, cause)
                queues[k] = []
                continue
            if produce is not None:
                outputs, chunk_tokens = result
            else:
                outputs, chunk_tokens = result, sum(c.completion_tokens for cs in result for c in cs)
            store.append([r for i, outs in zip(part, outputs, strict=True) for r in rows_of(i, outs)], shard=k)
            made, tokens = made + len(part), tokens + chunk_tokens
            if progress is not None:
                progress(len(part), chunk_tokens)
            if failure is None:
                submit(k)
    finally:
        for actor in workers.values():
            ray.kill(actor)
    if failure is not None:
        k, cause = failure
        raise SelfAlignError(f"{config.label}: Ray worker {k} of {n} stopped part-way ({type(cause).__name__}: "
                             f"{str(cause).splitlines()[0] if str(cause) else 'no message'})",
                             f"the {len(store)} rows written so far are kept; run the same command "
                             "again to make the rest")
    return made, tokens
