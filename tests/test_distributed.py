"""Scaling out, run for real on this CPU (marker `distributed`; CI runs them after the slow tests when
time allows): a local Ray cluster with 2 workers and one killed part-way, and 2-process DDP training
(gloo) under `accelerate launch` against one process at the same global batch."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from selfalign.core.errors import SelfAlignError
from selfalign.core.store import read_jsonl, shard_paths

pytestmark = pytest.mark.distributed

PROMPTS = [f"Question {i}: {q}" for i, q in enumerate(
    ["What is a cat?", "Name a colour.", "Say hi.", "Count to three.", "Why is the sky blue?", "What is rain?",
     "Write a word.", "Tell a joke.", "What is two plus two?", "Where is Paris?", "Who are you?", "Spell dog.",
     "What is snow?", "Name a fruit.", "What is a tree?", "Say bye.", "Pick a number.", "What is a bird?",
     "Name a day.", "What is fire?"])]


def generate_recipe(tmp_path: Path, workers: int | None, name: str):
    from selfalign.stages import parse_recipe

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    # Sampled: every sample's seed comes from the sampling seed, its prompt and its index (never from the batch or
    # the worker it landed in), so the split over workers cannot change a row.
    stage = {"stage": "generate", "prompts": str(prompts),
             "sampling": {"n": 2, "temperature": 0.8, "max_new_tokens": 8}}
    if workers:
        stage["workers"] = workers
    return parse_recipe({"name": name, "model": "tiny:llama", "engine": {"name": "hf", "batch_size": 2, "device": "cpu",
                                                                          "dtype": "float32"}, "stages": [stage]})


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="pip install 'selfalign[ray]'")
    # Ray starts its workers at niceness 15, which on a shared, loaded machine starves them for minutes
    os.environ.setdefault("RAY_worker_niceness", "0")
    for attempt in range(3):  # Ray gives its raylet 30 s to register, which a loaded 2-core machine can miss
        try:
            # its workers inherit SELFALIGN_CACHE (the tests' private cache)
            ray.init(num_cpus=2, include_dashboard=False)
            break
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


def test_ray_workers_killed_part_way_then_rerun_write_every_row_once(ray_cluster, tmp_path):
    from selfalign.core.distributed import worker_name
    from selfalign.stages import run_recipe

    ray = ray_cluster
    one = tmp_path / "one"
    run_recipe(generate_recipe(tmp_path, None, "one"), one)
    want = sorted(read_jsonl(one / "01-generate" / "rows.jsonl"), key=lambda r: r["id"])
    assert len(want) == 2 * len(PROMPTS)

    two = tmp_path / "two"
    folder = two / "01-generate"
    killed = threading.Event()

    def kill_worker_1_part_way():  # once worker 1 has written one chunk (2 prompts x 2 samples)
        deadline = time.time() + 300
        while time.time() < deadline:
            shard = folder / "rows.shard-1.jsonl"
            if shard.exists() and len(shard.read_text().splitlines()) >= 4:
                ray.kill(ray.get_actor(worker_name("generate", 1)))
                killed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_worker_1_part_way, daemon=True)
    watcher.start()
    with pytest.raises(SelfAlignError, match="Ray worker 1 of 2 stopped part-way"):
        run_recipe(generate_recipe(tmp_path, 2, "two"), two)
    watcher.join()
    assert killed.is_set()
    partial = [r for p in [folder / "rows.jsonl", *shard_paths(folder)] if p.exists() for r in read_jsonl(p)]
    assert 4 <= len(partial) < len(want) and shard_paths(folder)  # some rows kept, in the workers' shards
    assert not (folder / "_done.json").exists()

    record = run_recipe(generate_recipe(tmp_path, 2, "two"), two)  # the same command again
    got = read_jsonl(folder / "rows.jsonl")
    assert not shard_paths(folder)  # merged once complete
    assert len(got) == len({r["id"] for r in got}) == len(want)  # every row exactly once
    assert sorted(got, key=lambda r: r["id"]) == want  # identical to the one-worker run
    assert (record["stages"]["generate"]["summary"]["generated_now"]
            == len(PROMPTS) - len({r["prompt_id"] for r in partial}))
    done = json.loads((folder / "_done.json").read_text())
    assert done["rows"] == len(want)


# -- training under `accelerate launch` (2 processes, gloo, on the CPU) ---------------------------------
ANSWERS = ["Paris is the capital of France.", "Two plus two is four.", "Cats are small furry animals.",
           "Rain is water falling from clouds.", "The sky looks blue because air scatters blue light.",
           "A tree is a tall plant with a trunk.", "Snow is frozen rain.", "Hello! How can I help?"]
# Tolerance: the same examples in every global batch and gradients averaged over the same tokens, so the
# losses differ only by float32 summation order: observed at most 2e-7 relative on this machine; allowed 1e-4.
REL_TOL = 1e-4


def training_recipe(tmp_path: Path, processes: int, name: str):
    from selfalign.stages import parse_recipe

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"id": f"a{i}", "prompt": f"Question {i}?", "answer": a}) + "\n"
                           for i, a in enumerate(ANSWERS * 2)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": a, "rejected": "I refuse."}) + "\n"
                             for i, a in enumerate(ANSWERS * 2)))
    per_device = 4 // processes  # the same global batch: 4 examples a step
    data = {"name": name, "model": "tiny:llama", "seed": 3, "stages": [
        {"stage": "engrave", "data": str(sft), "system": "Be helpful.",
         "train": {"r": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-3, "epochs": 2, "batch_size": per_device,
                   "max_length": 96, "warmup_ratio": 0.0}},
        {"stage": "reward_model", "data": str(pairs), "heldout": 0.0,
         "train": {"lr": 1e-3, "batch_size": per_device, "max_length": 96, "warmup_ratio": 0.0, "epochs": 2}}]}
    if processes > 1:
        data["launcher"] = {"config": "cpu_ddp", "num_processes": processes, "save_steps": 2}
    return parse_recipe(data)


def losses(folder: Path) -> list[float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [x["loss"] for x in state["log_history"] if "loss" in x]


def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path):
    from selfalign.core.models import resolve
    from selfalign.stages import run_recipe

    # built before either run: the run that builds tiny:llama draws its reward head after the build reseeded torch's
    # generator, so it would start from another head than runs that load the cached model (the launched processes)
    resolve("tiny:llama")
    one = run_recipe(training_recipe(tmp_path, 1, "one"), tmp_path / "one")
    two = run_recipe(training_recipe(tmp_path, 2, "two"), tmp_path / "two")
    for i, label in enumerate(["engrave", "reward_model"], start=1):
        a, b = one["stages"][label]["summary"], two["stages"][label]["summary"]
        assert a["steps"] == b["steps"] == 8  # 16 examples / 4 a step x 2 epochs
        seq_a, seq_b = losses(tmp_path / "one" / f"0{i}-{label}"), losses(tmp_path / "two" / f"0{i}-{label}")
        assert len(seq_a) == len(seq_b) == 8
        assert seq_b == pytest.approx(seq_a, rel=REL_TOL), label
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=REL_TOL)
        folder = tmp_path / "two" / f"0{i}-{label}"
        assert not list(folder.rglob("checkpoint-*"))  # resumable while it ran, deleted once done
        assert (Path(b["model"]) / "adapter_config.json").exists() or (Path(b["model"]) / "config.json").exists()
