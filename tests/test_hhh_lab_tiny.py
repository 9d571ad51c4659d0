"""The HHH-laboratory recipe end to end on a tiny in-process model, and the prompt-gain arithmetic."""

import json

import pytest
import yaml
from test_evals import make_fixture

from selfalign.core.recipe import find_recipe
from selfalign.methods.hhh_lab.prompt_gain import kept_fractions
from selfalign.stages import parse_recipe, run_recipe


def test_kept_fraction_hand_cases():
    k = ("hhh", "likelihood", "overall")
    rows = kept_fractions({k: 0.40}, {k: 0.50}, {k: 0.45}, 1e-6)
    assert rows[0]["gain"] == pytest.approx(0.10) and rows[0]["kept_fraction"] == pytest.approx(0.5)
    assert kept_fractions({k: 0.4}, {k: 0.4}, {k: 0.5}, 1e-6)[0]["kept_fraction"] is None  # no gain: no ratio
    assert kept_fractions({k: 0.4}, {k: 0.5}, {k: 0.3}, 1e-6)[0]["kept_fraction"] == pytest.approx(-1.0)
    assert kept_fractions({k: 0.4}, {}, {k: 0.3}, 1e-6) == []  # only shared metrics


def test_hhh_lab_recipe_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, private_cache):
    from selfalign.stages import build_report

    monkeypatch.setenv("SELFALIGN_DATA_DIR", str(make_fixture(tmp_path / "data")))
    recipe = yaml.safe_load(find_recipe("hhh_lab").read_text())
    recipe["model"] = "tiny:llama"
    for stage in recipe["stages"]:
        if stage["stage"] == "pm_scaling":
            stage.update(sizes=[1, 2])
            stage["train"] = {**stage.get("train", {}), "epochs": 1}
        if stage["stage"] == "eval":
            stage.update(limit=2, max_new_tokens=16)  # 2 items per category or kind: the full sets are slow here
        if stage["stage"] == "compare":
            # with two replies a prompt, the length filter drops every pair whose chosen reply is the
            # shorter: a coin flip per pair on a random model, so 4 prompts lose all pairs 1 time in 16
            # (it did when the sampling streams changed); the filter has its own tests
            stage.update(length_filter=False)
        if stage["stage"] == "context_distill":
            # the 5k-token prompt is slow here
            stage.update(system="You are a careful, honest and kind assistant.", k=8)
    out = tmp_path / "run"
    run_recipe(parse_recipe(recipe, "hhh_lab.yaml", {"max_prompts": 4}), out)
    record = json.loads((out / "run.json").read_text())
    assert list(record["stages"]) == ["eval_plain", "eval_prompted", "context_distill", "eval_distilled", "prompt_gain",
                                      "pmp_corpus", "target", "pmp", "pm_scaling"]
    gain = json.loads(next(out.glob("*-prompt_gain/results.json")).read_text())
    assert ("hhh", "likelihood", "overall") in {(r["eval"], r["metric"], r["key"]) for r in gain["rows"]}
    assert {r["eval"] for r in gain["rows"]} >= {"hhh", "truthfulqa", "behaviour"}
    points = [json.loads(x) for x in next(out.glob("*-pm_scaling/rows.jsonl")).read_text().splitlines()]
    assert {(p["objective"], p["n"], bool(p.get("init"))) for p in points} == {
        *((o, n, False) for o in ("ranked", "binary", "imitation") for n in (1, 2)), ("ranked", 1, True),
        ("ranked", 2, True)}
    html = build_report(out).read_text()
    assert "the prompt&#x27;s gain kept" in html or "the prompt's gain kept" in html
    assert "accuracy vs data" in html
