from pathlib import Path

import pytest

from selfalign.core.errors import SelfAlignError
from selfalign.stages import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "selfalign" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.stages and recipe.name


def test_shipped_recipe_by_name_and_default():
    assert load_recipe(None).name == "quickstart"
    assert load_recipe("quickstart").name == "quickstart"


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """
name: t
model: tiny:llama
stages:
  - stage: generate
    prompts: builtin:quickstart
"""


def test_unknown_key_names_file_key_and_expected(tmp_path):
    p = write(tmp_path, BASE + "    sampling: {temprature: 0.5}\n")
    with pytest.raises(SelfAlignError) as info:
        load_recipe(p)
    msg = str(info.value)
    assert str(p) in msg
    assert "stages[0].sampling.temprature: unknown key" in msg
    assert "temperature" in msg  # what was expected


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, BASE + "modle: x\n")
    with pytest.raises(SelfAlignError, match=r"modle: unknown key \(expected one of: name, description, model"):
        load_recipe(p)


def test_wrong_type_names_the_key_and_value(tmp_path):
    p = write(tmp_path, BASE + "    sampling: {max_new_tokens: lots}\n")
    with pytest.raises(SelfAlignError, match=r"stages\[0\].sampling.max_new_tokens: .*'lots'"):
        load_recipe(p)


def test_unknown_stage_lists_stages(tmp_path):
    p = write(tmp_path, "name: t\nstages:\n  - stage: dance\n")
    with pytest.raises(SelfAlignError, match=r"stages\[0\].stage: unknown stage 'dance' \(expected one of: generate"):
        load_recipe(p)


def test_malformed_yaml_names_line(tmp_path):
    p = write(tmp_path, "name: t\nstages: [\n  - {stage: generate\n")
    with pytest.raises(SelfAlignError, match=r"r.yaml: line \d+, column \d+: invalid YAML"):
        load_recipe(p)


def test_empty_and_missing_recipe(tmp_path):
    with pytest.raises(SelfAlignError, match="empty"):
        load_recipe(write(tmp_path, ""))
    with pytest.raises(SelfAlignError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_missing_required_key(tmp_path):
    with pytest.raises(SelfAlignError, match=r"stages\[0\].prompts: required key is missing"):
        load_recipe(write(tmp_path, "name: t\nstages:\n  - stage: generate\n"))


def test_duplicate_stage_names_rejected():
    data = {"name": "t", "stages": [{"stage": "generate", "prompts": "x"}, {"stage": "generate", "prompts": "y"}]}
    with pytest.raises(SelfAlignError, match="share the name 'generate'"):
        parse_recipe(data)


def test_cli_overrides_win(tmp_path):
    p = write(tmp_path, BASE + "engine: {name: hf, batch_size: 3}\n")
    r = load_recipe(p, {"model": "tiny:gemma3", "out": "x/y", "engine": "openai", "max_prompts": 2, "seed": None})
    assert r.model == "tiny:gemma3" and str(r.run_dir()) == "x/y" and r.max_prompts == 2
    assert r.engine.name == "openai" and r.engine.batch_size == 3
    assert "base_url" in r.engine.options() and "device" not in r.engine.options()


def test_partial_sampling_block_keeps_the_stage_defaults():
    from selfalign.methods.self_align.self_align import Config

    config = Config(sampling={"max_new_tokens": 64})
    assert config.sampling.max_new_tokens == 64
    assert (config.sampling.temperature, config.sampling.top_p) == (0.5, 0.9)  # the paper's, not Sampling's 1.0/1.0
    assert Config().sampling.max_new_tokens == 256


def test_the_run_folders_recipe_snapshot_keeps_every_stage_field(tmp_path):
    """recipe.yaml in a run folder is the recipe as run: each stage's own fields, not only the base ones,
    so it can be read back into the same recipe."""
    import yaml

    from selfalign.core.pipeline import _write_recipe_snapshot

    recipe = load_recipe("quickstart")
    _write_recipe_snapshot(recipe, tmp_path)
    snapshot = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    self_align = next(s for s in snapshot["stages"] if s["stage"] == "self_align")
    assert self_align["max_prompts"] == 128 and self_align["thoughts_tokens"] == 40
    assert next(s for s in snapshot["stages"] if s["stage"] == "engrave")["train"]["epochs"] == 2  # not the default 1
    again = parse_recipe(snapshot, "recipe.yaml")
    assert [s.model_dump() for s in again.stages] == [s.model_dump() for s in recipe.stages]
