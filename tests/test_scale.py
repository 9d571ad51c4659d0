"""Scaling out, the fast part (no Ray cluster, no second process): recipe validation of `engine`
parallelism, `workers` and `launcher`, the row store's shards, and the exact `accelerate launch`
command lines a recipe builds. The runs themselves are in tests/test_distributed.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from selfalign.core.errors import SelfAlignError
from selfalign.stages import parse_recipe


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "selfalign.cli", *args], capture_output=True, text=True,
                          env={**os.environ}, cwd=cwd)


def write_recipe(tmp_path, **top):
    data = {"name": "scale", "model": "tiny:llama",
            "stages": [{"stage": "generate", "prompts": "builtin:quickstart", "sampling": {"max_new_tokens": 4}}],
            **top}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- vLLM parallelism ---------------------------------------------------------------------------------
def test_tensor_parallel_on_hf_is_one_line_exit_2(tmp_path):
    path = write_recipe(tmp_path, engine={"name": "hf", "tensor_parallel_size": 2})
    out = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert "engine" in lines[0] and "tensor_parallel_size is a vllm setting" in lines[0]
    assert not (tmp_path / "run").exists()


def test_parallelism_is_accepted_on_vllm_and_not_fingerprinted():
    from selfalign.core.fingerprint import stage_settings

    base = {"name": "x", "stages": [{"stage": "generate", "prompts": "builtin:quickstart"}]}
    plain = parse_recipe({**base, "engine": {"name": "vllm"}})
    wide = parse_recipe({**base, "engine": {"name": "vllm", "tensor_parallel_size": 8, "data_parallel_size": 2}})
    assert wide.engine.options()["tensor_parallel_size"] == 8 and "pipeline_parallel_size" not in wide.engine.options()
    assert stage_settings(plain, plain.stages[0], {}) == stage_settings(wide, wide.stages[0], {})
    for bad in ({"name": "openai", "data_parallel_size": 2}, {"name": "vllm", "tensor_parallel_size": 0}):
        with pytest.raises(SelfAlignError):
            parse_recipe({**base, "engine": bad})


# -- workers (Ray) ------------------------------------------------------------------------------------
def test_workers_without_ray_name_the_field_and_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    data = {"name": "x", "model": "tiny:llama",
            "stages": [{"stage": "generate", "prompts": "builtin:quickstart", "workers": 3}]}
    with pytest.raises(SelfAlignError) as err:
        parse_recipe(data)
    assert (str(err.value)
            == "<recipe>: stages[0].workers: 3 needs Ray, which is not installed: pip install 'selfalign[ray]'")
    path = write_recipe(tmp_path)  # the same from the command line, as one line, exit 2
    data["stages"][0]["workers"] = 3
    path.write_text(yaml.safe_dump(data))
    hide_ray = tmp_path / "hide_ray"
    hide_ray.mkdir()
    (hide_ray / "ray.py").write_text("raise ImportError('no ray here')\n")
    out = subprocess.run([sys.executable, "-m", "selfalign.cli", "run", str(path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True,
                         env={**os.environ,
                              "PYTHONPATH": os.pathsep.join([str(hide_ray), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert (len(lines) == 1 and "stages[0].workers: 3 needs Ray" in lines[0]
            and "pip install 'selfalign[ray]'" in lines[0])


def test_workers_only_on_generation_stages_and_not_fingerprinted():
    from selfalign.core.fingerprint import stage_settings

    with pytest.raises(SelfAlignError, match=r"stages\[0\].workers: 'engrave' is not a generation stage"):
        parse_recipe({"name": "x", "stages": [{"stage": "engrave", "data": "x.jsonl", "workers": 2}]})
    with pytest.raises(SelfAlignError, match="workers"):
        parse_recipe({"name": "x", "stages": [{"stage": "generate", "prompts": "builtin:quickstart", "workers": 0}]})
    base = {"name": "x", "stages": [{"stage": "self_align", "prompts": "builtin:quickstart"}]}
    one = parse_recipe(base)
    pytest.importorskip("ray")
    many = parse_recipe({**base, "stages": [{**base["stages"][0], "workers": 4, "ray_address": "auto"}]})
    assert stage_settings(one, one.stages[0], {}) == stage_settings(many, many.stages[0], {})


def test_split_by_row_id_is_a_partition_that_ignores_position():
    from selfalign.core.distributed import split_by_row_id
    from selfalign.core.store import row_id

    ids = [[row_id("x", i, j) for j in range(2)] for i in range(50)]
    shares = split_by_row_id(range(50), ids, 3)
    assert sorted(i for s in shares for i in s) == list(range(50)) and all(shares)
    later = split_by_row_id(range(20, 50), ids, 3)  # a resume: what a job's worker is does not depend on the others
    assert [[i for i in s if i >= 20] for s in shares] == later


# -- the row store's shards ---------------------------------------------------------------------------
def test_store_reads_shards_as_one_and_merges_them(tmp_path):
    from selfalign.core.store import RowStore, read_jsonl, shard_path, shard_paths

    store = RowStore(tmp_path)
    store.append([{"id": "a", "v": 1}])
    store.append([{"id": "b", "v": 2}, {"id": "c", "v": 3}], shard=1)
    store.append([{"id": "d", "v": 4}], shard=0)
    assert store.append([{"id": "c", "v": 99}], shard=0) == 0  # exactly once, across files
    assert shard_paths(tmp_path) == [shard_path(tmp_path, "rows.jsonl", 0), shard_path(tmp_path, "rows.jsonl", 1)]
    assert shard_path(tmp_path, "responses.jsonl", 10).name == "responses.shard-10.jsonl"
    (tmp_path / "rows.shard-x.jsonl").write_text('{"id": "zz"}\n')  # not a shard: ignored
    with open(tmp_path / "rows.shard-1.jsonl", "a") as f:
        f.write('{"id": "e", "v"')  # a worker's half-written last row
    with open(tmp_path / "rows.shard-0.jsonl", "a") as f:
        f.write('{"id": "a", "v": 1}\n')  # a row in two files (a merge killed half-way): read once

    peek = RowStore(tmp_path, repair=False)  # a reader beside writers: skips the torn line, touches nothing
    assert sorted(peek.done_ids()) == ["a", "b", "c", "d"]
    assert (tmp_path / "rows.shard-1.jsonl").read_text().endswith('"v"')

    again = RowStore(tmp_path)
    assert sorted(again.done_ids()) == ["a", "b", "c", "d"] and len(again) == 4
    assert again.repaired_tail == '{"id": "e", "v"'
    assert again.merge_shards() == 2
    assert not shard_paths(tmp_path)
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "rows.jsonl")) == ["a", "b", "c", "d"]
    assert RowStore(tmp_path).merge_shards() == 0


# -- launcher (accelerate) ----------------------------------------------------------------------------
LAUNCH_STAGES = [{"stage": "generate", "prompts": "builtin:quickstart"},
                 {"stage": "engrave", "data": "@generate"},
                 {"stage": "reward_model", "data": "pairs.jsonl"}]


def test_launcher_validation():
    from selfalign.core.launcher import SHIPPED, accelerate_config

    for name in SHIPPED:  # every shipped accelerate config exists and is YAML accelerate can read
        cfg = yaml.safe_load(accelerate_config(name).read_text())
        assert cfg["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED") and cfg["num_processes"] >= 2
    base = {"name": "x", "model": "tiny:llama", "stages": LAUNCH_STAGES}
    bad = [({"config": "ddp", "num_processes": 0}, "num_processes"),
           ({"config": "nope.yaml", "num_processes": 2}, "neither a shipped accelerate config"),
           ({"config": "ddp", "num_processes": 2, "stages": ["generate"]},
            "'generate' is a generate stage, which does not train"),
           ({"config": "ddp", "num_processes": 2, "stages": ["engrav"]}, "no stage named 'engrav'"),
           ({"config": "ddp", "num_process": 2}, "unknown key")]
    for launcher, message in bad:
        with pytest.raises(SelfAlignError, match=message):
            parse_recipe({**base, "launcher": launcher})


def test_launch_command_is_exactly_accelerate_launch(tmp_path):
    """The dry run of the README's one-node command: what the pipeline runs for each launched stage."""
    from selfalign.core.fingerprint import stage_settings
    from selfalign.core.launcher import accelerate_configs_dir, launch_command, launched

    recipe = parse_recipe({"name": "x", "model": "tiny:llama", "stages": LAUNCH_STAGES,
                           "launcher": {"config": "ddp", "num_processes": 8, "stages": ["engrave"]}})
    assert [launched(recipe, c) for c in recipe.stages] == [False, True, False]
    assert launch_command(recipe, tmp_path / "run", "engrave") == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_configs_dir() / "ddp.yaml"),
        "--num_processes", "8", "-m", "selfalign.launch", str((tmp_path / "run").resolve()), "engrave"]
    every = parse_recipe({"name": "x", "model": "tiny:llama", "stages": LAUNCH_STAGES,
                          "launcher": {"config": "zero3", "num_processes": 2,
                                       "extra_args": ["--num_machines", "2", "--machine_rank", "0"]}})
    assert [launched(every, c) for c in every.stages] == [False, True, True]
    assert (launch_command(every, "r", "reward_model")[5:10]
            == ["--num_processes", "2", "--num_machines", "2", "--machine_rank"])
    # batch_size is per process, so the number of processes is part of a launched stage's fingerprint
    plain = parse_recipe({"name": "x", "model": "tiny:llama", "stages": LAUNCH_STAGES})
    assert stage_settings(every, every.stages[1], {})["launcher.num_processes"] == 2
    assert "launcher.num_processes" not in stage_settings(plain, plain.stages[1], {})
    assert stage_settings(every, every.stages[0], {}) == stage_settings(plain, plain.stages[0], {})
    # `python -m accelerate.commands.launch` is `accelerate launch`: the same entry point
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--config_file" in out.stdout and "--num_processes" in out.stdout


# -- the README's "Scaling out" commands, as dry runs -------------------------------------------------
def readme_scaling_commands() -> list[list[str]]:
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("selfalign ")]


def test_readme_scaling_commands_build_what_they_say(tmp_path, monkeypatch):
    """Each README command loads its recipe as `selfalign run` does, and the settings it promises are there;
    the 8-GPU node's training command is the exact `accelerate launch` line. (The laptop command runs for real in
    the quickstart tests; the Ray one runs on a local cluster in tests/test_distributed.py.)"""
    from selfalign.core.launcher import accelerate_configs_dir, launch_command, launched
    from selfalign.stages import load_recipe

    monkeypatch.setattr("selfalign.core.distributed.ray_installed", lambda: True)  # validated here, not run
    commands = readme_scaling_commands()
    assert [c[:3] for c in commands] == [["selfalign", "run", name] for name in
                                         ("quickstart", "self_align", "self_align_node", "self_align_ray")]
    recipes = []
    for cmd in commands:
        opts = dict(zip(cmd[3::2], cmd[4::2], strict=True))
        assert set(opts) <= {"--model", "--out"}
        recipes.append(load_recipe(cmd[2], {"model": opts.get("--model"), "out": opts.get("--out")}))
    laptop, gpu, node, cluster = recipes
    assert laptop.engine.name == "hf" and laptop.launcher is None
    assert gpu.engine.name == "vllm" and gpu.model == "meta-llama/Llama-3.1-8B" and gpu.launcher is None
    assert node.engine.tensor_parallel_size == 8 and node.model == "meta-llama/Llama-3.1-70B"
    assert [c.label for c in node.stages if launched(node, c)] == ["engrave"]
    assert launch_command(node, node.run_dir(), "engrave") == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_configs_dir() / "ddp.yaml"),
        "--num_processes", "8", "-m", "selfalign.launch", str(node.run_dir().resolve()), "engrave"]
    spread = {c.label: (c.workers, c.ray_address) for c in cluster.stages if c.workers}
    assert spread == {"self_instruct": (16, "auto"), "self_align": (16, "auto"), "verbose_clone": (16, "auto")}
    # apart from where they run, the node and cluster recipes are recipes/self_align.yaml's stages and settings
    same = lambda r: [c.model_dump(exclude={"workers": True, "ray_address": True, "train": {"batch_size"}})  # noqa: E731
                      for c in r.stages]
    assert same(node) == same(gpu) == same(cluster)


# -- checkpoints under a launch: a killed training resumes ----------------------------------------------
def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """What a launched stage's processes do (SELFALIGN_SAVE_STEPS set by the launcher), in one process: a
    checkpoint every 2 steps; killed at step 5, the next run resumes from checkpoint-4 and logs the losses an
    uninterrupted run logs."""
    import json

    import selfalign.core.training as training
    from selfalign.core.launcher import SAVE_STEPS_ENV
    from selfalign.core.models import resolve
    from selfalign.stages import run_recipe

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i}.",
                                         "rejected": "No."}) + "\n"
                             for i in range(16)))

    def recipe(name):
        return parse_recipe({"name": name, "model": "tiny:llama", "stages": [
            {"stage": "reward_model", "data": str(pairs), "heldout": 0.0,
             "train": {"lr": 1e-3, "batch_size": 4, "epochs": 2, "max_length": 64, "warmup_ratio": 0.0}}]})

    def losses(run):
        state = json.loads((tmp_path / run / "01-reward_model" / "trainer_state.json").read_text())
        return [x["loss"] for x in state["log_history"] if "loss" in x]

    # built beforehand: a run that builds it starts from another score head (see test_distributed)
    resolve("tiny:llama")
    run_recipe(recipe("whole"), tmp_path / "whole")
    monkeypatch.setenv(SAVE_STEPS_ENV, "2")
    real = training._progress_callback

    class Killed(Exception):
        pass

    def dies_at_step_5(examples_per_step):
        callback = real(examples_per_step)
        step_end = callback.on_step_end

        def on_step_end(args, state, control, **kwargs):
            if state.global_step == 5:
                raise Killed
            return step_end(args, state, control, **kwargs)

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(training, "_progress_callback", dies_at_step_5)
    with pytest.raises(Killed):
        run_recipe(recipe("killed"), tmp_path / "killed")
    folder = tmp_path / "killed" / "01-reward_model"
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-4"]
    monkeypatch.setattr(training, "_progress_callback", real)
    run_recipe(recipe("killed"), tmp_path / "killed")
    assert len(losses("whole")) == 8
    assert losses("killed") == pytest.approx(losses("whole"), rel=1e-5)


def test_launched_processes_read_back_the_whole_recipe():
    from selfalign.core.launcher import recipe_data

    recipe = parse_recipe({"name": "x", "model": "tiny:llama", "stages": LAUNCH_STAGES, "seed": 5,
                           "launcher": {"config": "ddp", "num_processes": 2}})
    again = parse_recipe(recipe_data(recipe))
    assert [c.model_dump() for c in again.stages] == [c.model_dump() for c in recipe.stages]
    assert again.model_dump(exclude={"stages"}) == recipe.model_dump(exclude={"stages"})
