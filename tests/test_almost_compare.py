"""ALMoST's prompt mining and synthetic comparisons: rubric, filters, the two stages, resuming."""

import json
import random
import statistics

import pytest

from selfalign.core.engines.base import Completion, Engine
from selfalign.core.errors import SelfAlignError
from selfalign.core.pipeline import RunContext
from selfalign.core.report import render_section
from selfalign.core.store import read_jsonl
from selfalign.methods.almost import compare as cmp
from selfalign.methods.almost import mine_prompts as mp
from selfalign.stages import parse_recipe


# -- rubric --------------------------------------------------------------------------------------
def test_rubric_tiers_ties_and_pairs():
    tiers = cmp.rank_by_rubric([["big"], ["mid", "mid2"], ["small"]], ["small", "mid", "big", "mid2"])
    assert tiers == {"big": 0, "mid": 1, "mid2": 1, "small": 2}
    pairs = cmp.rubric_pairs(tiers)
    assert ("mid", "mid2") not in pairs and ("mid2", "mid") not in pairs  # tied: no pair
    assert set(pairs) == {("big", "mid"), ("big", "mid2"), ("big", "small"), ("mid", "small"), ("mid2", "small")}
    assert all(tiers[a] < tiers[b] for a, b in pairs)


@pytest.mark.parametrize("rubric, match", [
    ([["a"], ["zzz"]], r"'zzz' \(tier 1\) is not a configuration"),
    ([["a", "b"], ["a"]], r"'a' appears twice"),
    ([["a"], ["b"]], r"configuration 'c' is not ranked"),
    ([["a", "b", "c"]], r"at least two tiers"),
    ([["a", "b"], [], ["c"]], r"tier 1 is empty"),
])
def test_rubric_errors(rubric, match):
    with pytest.raises(ValueError, match=match):
        cmp.rank_by_rubric(rubric, ["a", "b", "c"])


def test_recipe_rubric_error_names_the_field():
    stage = {"stage": "compare", "prompts": "x.txt", "configurations": [{"name": "a"}, {"name": "b", "system": "hhh"}],
             "rubric": [["a"], ["nope"]]}
    with pytest.raises(SelfAlignError, match=r"r\.yaml: stages\[0\]\.rubric: .*'nope'.*is not a configuration"):
        parse_recipe({"name": "t", "stages": [stage]}, "r.yaml")
    stage["configurations"].append({"name": "a"})
    with pytest.raises(SelfAlignError, match=r"stages\[0\]\.configurations: .*two configurations are named 'a'"):
        parse_recipe({"name": "t", "stages": [stage]}, "r.yaml")
    assert parse_recipe({"name": "t", "stages": [{**stage, "configurations": stage["configurations"][:2],
                                                  "rubric": ["b", "a"]}]}).stages[0].sampling.model_dump(
        include={"temperature", "top_p"}) == {"temperature": 1.0, "top_p": 0.9}  # the paper's sampling
    ok = parse_recipe({"name": "t", "stages": [{**stage, "configurations": stage["configurations"][:2],
                                                 "rubric": ["b", "a"]}]})
    assert ok.stages[0].rubric == [["b"], ["a"]]  # a bare name is a tier of one


# -- the bad-response rules and the length heuristic -------------------------------------------------
GOOD = "Boil the kettle, pour the water over the leaves and wait three minutes."


@pytest.mark.parametrize("text, rules", [
    (GOOD, []),
    (GOOD.replace(".", "!"), []),
    ("  " + GOOD + "\n", []),  # surrounding whitespace does not count
    ("Too short, but it ends well.", ["under 50 characters"]),
    (GOOD[:-1] + "? Would that help you at all today", ["does not end with '.' or '!'"]),
    (GOOD[:-1] + ", would that help you at all?", ["ends with '?'", "does not end with '.' or '!'"]),
    ("Here is what you need to do to get the best result from this:",
     ["ends with ':'", "does not end with '.' or '!'"]),
    (GOOD + " It keeps going without a full stop", ["does not end with '.' or '!'"]),
    (GOOD + " User: thanks, and what about green tea.", ["contains a role marker (User:)"]),
    ("Sure. Human: can you do it for me? Assistant: of course I can do it.", ["contains a role marker (Human:)"]),
    (GOOD + " Assistant : fine.", ["contains a role marker (Assistant:)"]),
])
def test_bad_response_rules(text, rules):
    assert cmp.bad_response_rules(text, 50) == rules


def test_bad_response_50_character_boundary():
    assert cmp.bad_response_rules("x" * 49 + ".") == []  # 50 characters: not under 50
    assert cmp.bad_response_rules("x" * 48 + ".") == ["under 50 characters"]


def test_length_filter_boundary_is_strict():
    mean, std = cmp.length_stats([50, 50, 50, 50, 75])
    assert (mean, std) == (55.0, 10.0)  # population std: sqrt(500 / 5)
    assert std != statistics.stdev([50, 50, 50, 50, 75])
    assert not cmp.length_filter_drops(50, 75, mean, std)  # exactly mean - std/2: kept
    assert cmp.length_filter_drops(49, 75, mean, std)
    assert not cmp.length_filter_drops(40, 30, mean, std)  # short, but not shorter than the rejected
    assert not cmp.length_filter_drops(60, 75, mean, std)  # shorter than the rejected, but not short


def _resp(pid, name, n):
    return {"id": f"{pid}-{name}", "response": "x" * (n - 1) + "."}


def test_make_pairs_verdicts_on_hand_made_lengths():
    tiers = cmp.rank_by_rubric([["a"], ["b"], ["c", "d"], ["e"]], list("abcde"))
    lengths = {"p1": dict(a=50, b=50, c=50, d=50, e=75),  # mean 55, std 10: a (50) vs e (75) sits on the boundary
               "p2": dict(a=100, b=58, c=60, d=60, e=120)}  # mean 79.6, std 25.6: threshold 66.8
    responses = {(pid, n): _resp(pid, n, k) for pid, ls in lengths.items() for n, k in ls.items()}
    rows = cmp.make_pairs([("p1", "q1"), ("p2", "q2")], responses, tiers, 50, True)
    assert len(rows) == 2 * 9  # 5 configurations, c and d tied: 10 - 1 pairs per prompt
    by = {(r["prompt_id"], r["chosen_config"], r["rejected_config"]): r for r in rows}
    edge = by[("p1", "a", "e")]
    assert edge["kept"] and edge["length_filter"]["threshold"] == 50.0 and not edge["length_filter"]["drop"]
    short = by[("p2", "b", "e")]
    assert not short["kept"] and short["dropped_by"].startswith("length_filter:")
    assert by[("p2", "a", "e")]["kept"]  # a is shorter than e but not below mean - std/2
    assert by[("p2", "a", "b")]["kept"]  # b is short, but it is the rejected one
    mean, std = cmp.length_stats(list(lengths["p2"].values()))
    assert all(r["length_filter"]["drop"] == (r["length_filter"]["chosen_chars"] < r["length_filter"]["rejected_chars"]
                                              and r["length_filter"]["chosen_chars"] < mean - std / 2)
               for r in rows if r["prompt_id"] == "p2")
    off = cmp.make_pairs([("p2", "q2")], responses, tiers, 50, False)
    assert all(r["kept"] for r in off) and any(r["length_filter"]["drop"] for r in off)  # recorded, not applied


def test_bad_chosen_drops_the_pair_bad_rejected_does_not():
    tiers = {"good": 0, "bad": 1}
    responses = {("p", "good"): {"id": "g", "response": GOOD}, ("p", "bad"): {"id": "b", "response": "Why?"}}
    [row] = cmp.make_pairs([("p", "q")], responses, tiers, 50, True)
    assert row["kept"] and row["rejected_bad"] and row["bad_response"] == []
    [row] = cmp.make_pairs([("p", "q")], responses, {"good": 1, "bad": 0}, 50, True)
    assert not row["kept"] and row["dropped_by"] == "bad_response: under 50 characters"
    assert row["bad_response"] == ["under 50 characters", "ends with '?'", "does not end with '.' or '!'"]


def test_post_validation_drops_the_most_negative_quantile():
    margins = [0.5, -3.0, -0.1, 2.0, -1.0, -0.2, -2.0, 0.0, -0.5, -0.3, -0.4, -0.05]  # 9 negative
    assert cmp.post_validation_drops(margins, 0.1) == [False] * 12  # floor(0.9) = 0
    drops = cmp.post_validation_drops(margins, 0.25)  # floor(2.25) = 2: -3.0 and -2.0
    assert [m for m, d in zip(margins, drops, strict=True) if d] == [-3.0, -2.0]
    assert sum(cmp.post_validation_drops(margins, 1.0)) == 9
    assert not any(cmp.post_validation_drops([0.1, 0.0, 2.0], 1.0))


def test_configuration_contexts():
    from selfalign.core.hhh_prompt import load_hhh_prompt
    from selfalign.evals.common import resolve_system

    hhh = load_hhh_prompt()
    full = cmp.configuration_context(cmp.Configuration(name="x", system="hhh"))
    assert full == resolve_system("hhh")  # all 14 dialogues: the project's HHH prompt
    one = cmp.configuration_context(cmp.Configuration(name="x", system="hhh", shots=1))
    assert one.startswith(hhh["preamble"].strip()[:40]) and one.count("\n\nHuman:") < full.count("\n\nHuman:")
    assert cmp.configuration_context(cmp.Configuration(name="x", system="hhh", shots=0)) == hhh["preamble"].strip()
    assert cmp.configuration_context(cmp.Configuration(name="x")) is None
    assert cmp.configuration_context(cmp.Configuration(name="x", system="none")) is None
    pre = cmp.configuration_context(cmp.Configuration(name="x", system="preamble", shots=2))
    assert pre.startswith(cmp.PREAMBLE_FILE.read_text().strip()) and pre.count("\n\n-----") == 3
    assert cmp.configuration_context(cmp.Configuration(name="x", system="Be kind.")) == "Be kind."
    with pytest.raises(SelfAlignError, match="shots is 15"):
        cmp.configuration_context(cmp.Configuration(name="x", system="hhh", shots=15))


# -- mine_prompts: filters --------------------------------------------------------------------------
POOL = ["alpha bravo charlie delta please explain"]


def test_mined_rouge_threshold_is_inclusive():
    # pool item: 6 tokens; 3 shared in order with a 6-token candidate: F1 = 2*3/12 = 0.5 -> dropped
    at = "alpha bravo charlie zulu yankee xray"
    below = "alpha bravo charlie zulu yankee xray whiskey"  # 2*3/13 < 0.5 -> kept
    v = mp.screen([at, below], POOL, 0.5, 10, 250)
    assert v[0]["dropped"] == mp.DUPLICATE and v[0]["rouge_l"] == 0.5 and v[0]["closest"] == POOL[0]
    assert v[1]["kept"] and v[1]["dropped"] is None
    # a candidate is also checked against the ones kept before it in the same round
    v = mp.screen([below, below + " now"], POOL, 0.5, 10, 250)
    assert v[0]["kept"] and v[1]["dropped"] == mp.DUPLICATE and v[1]["closest"] == below


def test_mined_length_bounds():
    pool = ["something entirely unrelated to the tests"]
    texts = ["q" * 29, "w" * 30, "e" * 250, "r" * 251, ""]
    v = mp.screen(texts, pool, 0.5, 30, 250)
    assert [x["dropped"] for x in v] == [mp.TOO_SHORT, None, None, mp.TOO_LONG, mp.NO_PROMPT]


def test_parse_mined():
    assert mp.parse_mined('  "How do I fold a fitted sheet?"\n12. next') == "How do I fold a fitted sheet?"
    assert mp.parse_mined("\n\n  Tell me   about tides.  \nmore") == "Tell me about tides."
    assert mp.parse_mined("   ") == ""


# -- scripted engines ----------------------------------------------------------------------------------
WORDS = ["otters", "violins", "glaciers", "tractors", "comets", "bakers", "lanterns", "parrots", "canals", "meteors",
         "tulips", "robots", "pirates", "volcanoes", "kettles", "wizards", "harbors", "beetles", "mirrors", "dragons"]


VOCAB = [w + end for w in WORDS for end in ("", "ly", "ness", "ish", "dom")]


class Boom(RuntimeError):
    pass


class ScriptedEngine(Engine):
    """Deterministic replies (a function of the request's text); raises after `fail_after` replies."""

    name = "hf"

    def __init__(self, reply, fail_after=None, batch=2):
        super().__init__("scripted")
        self.reply, self.fail_after, self.batch = reply, fail_after, batch
        self.seen: list = []

    def generate_iter(self, requests, sampling):
        for start in range(0, len(requests), self.batch):
            out = []
            for i in range(start, min(start + self.batch, len(requests))):
                if self.fail_after is not None and len(self.seen) >= self.fail_after:
                    raise Boom("killed")
                self.seen.append(requests[i])
                out.append((i, [Completion(self.reply(requests[i]), "stop", 7, 3)]))
            yield out

    def score_many(self, items):
        raise NotImplementedError


def mining_reply(request: str) -> str:
    rng = random.Random(request)
    kind = rng.random()
    shown = [line.split(". ", 1)[1] for line in request.splitlines() if line[:1].isdigit() and ". " in line]
    if kind < 0.2:
        return " " + shown[0] + "\n12."  # a copy of a shown prompt: a ROUGE-L duplicate
    if kind < 0.3:
        return " Why?\n"  # too short
    return " " + " ".join(rng.sample(VOCAB, 8)).capitalize() + "?\n12. more"


def make_ctx(tmp_path, stages, engines, **recipe):
    r = parse_recipe({"name": "t", "model": "m-big", "stages": stages, **recipe})
    ctx = RunContext(recipe=r, run_dir=tmp_path)
    for model, engine in engines.items():
        ctx.engines[(model, "hf")] = engine
    return ctx, r.stages


def _seeds(tmp_path):
    path = tmp_path / "seeds.yaml"
    path.write_text("- How should I prepare for a job interview next week?\n"
                    "- prompt: Explain how a rainbow forms after a storm.\n"
                    "- Write a short poem about a cat watching the rain.\n"
                    "- What are good ways to learn to cook on a budget?\n")
    return str(path)


MINE = {"stage": "mine_prompts", "target": 12, "max_rounds": 6, "requests_per_round": 5, "shots": 3}


def test_mine_prompts_stage_rows_and_prompt_source(tmp_path):
    engine = ScriptedEngine(mining_reply)
    ctx, (config,) = make_ctx(tmp_path, [{**MINE, "seeds": _seeds(tmp_path)}], {"m-big": engine})
    folder = tmp_path / "01-mine_prompts"
    ctx.stage_dirs["mine_prompts"] = folder
    summary = mp.run(ctx, config, folder)
    rows = read_jsonl(folder / "rows.jsonl")
    mined = [r for r in rows if r["source"] == "mined"]
    assert summary["mined"] == sum(r["kept"] for r in mined) == 12
    assert len(mined) == summary["candidates"] == len(engine.seen) == 5 * summary["rounds"]
    assert all(r["kept"] == (r["dropped"] is None) for r in rows)
    assert {r["dropped"] for r in mined if not r["kept"]} >= {mp.DUPLICATE, mp.TOO_SHORT}
    assert all(r["meta"]["sampling"]["temperature"] == 1.2 and r["meta"]["sampling"]["max_new_tokens"] == 64
               for r in mined)
    assert all(30 <= len(r["prompt"]) <= 250 for r in rows if r["kept"])
    # each request shows 3 prompts; later rounds may show mined ones
    assert all(req.rstrip().endswith("4.") for req in engine.seen)
    kept_mined = {r["prompt"] for r in mined if r["kept"]}
    assert any(any(k in req for k in kept_mined) for req in engine.seen[5:])
    # a later stage reads the kept prompts (seeds included) with prompts: "@mine_prompts"
    source = ctx.prompts("@mine_prompts")
    assert [p for _, p in source] == [r["prompt"] for r in rows if r["kept"]] and len(source) == 4 + 12
    assert len({pid for pid, _ in source}) == len(source)
    # rerun with stricter settings: the rows are those of the new settings only, nothing stale is left
    ctx, (config,) = make_ctx(tmp_path, [{**MINE, "seeds": _seeds(tmp_path), "min_chars": 70}], {"m-big": engine})
    again = mp.run(ctx, config, folder)
    rows = read_jsonl(folder / "rows.jsonl")
    assert len(rows) == 4 + again["candidates"] and again["mined"] == 12
    assert all(len(r["prompt"]) >= 70 for r in rows if r["kept"] and r["source"] == "mined")


def test_mine_prompts_killed_half_way_resumes_without_repeats(tmp_path):
    seeds = _seeds(tmp_path)
    whole = ScriptedEngine(mining_reply)
    ctx, (config,) = make_ctx(tmp_path, [{**MINE, "seeds": seeds}], {"m-big": whole})
    mp.run(ctx, config, tmp_path / "whole")
    expected = read_jsonl(tmp_path / "whole" / "rows.jsonl")

    dying = ScriptedEngine(mining_reply, fail_after=8)  # dies in the middle of a batch of round 2
    ctx, (config,) = make_ctx(tmp_path, [{**MINE, "seeds": seeds}], {"m-big": dying})
    with pytest.raises(Boom):
        mp.run(ctx, config, tmp_path / "killed")
    written = len(read_jsonl(tmp_path / "killed" / "raw" / "rows.jsonl"))
    assert 0 < written < len(whole.seen) and len(dying.seen) == written + 1  # one request was in flight
    again = ScriptedEngine(mining_reply)
    ctx, (config,) = make_ctx(tmp_path, [{**MINE, "seeds": seeds}], {"m-big": again})
    mp.run(ctx, config, tmp_path / "killed")
    assert len(again.seen) == len(whole.seen) - written  # the lost request is made again, nothing else
    assert not set(again.seen) & set(dying.seen[:written])
    assert read_jsonl(tmp_path / "killed" / "rows.jsonl") == expected


# -- compare: the stage -----------------------------------------------------------------------------------
PROMPTS = ["How do I keep basil alive on a windowsill?", "Explain what a mortgage is.",
           "Write a haiku about trains.", "What should I pack for a rainy weekend in the hills?",
           "How can I stop procrastinating on my thesis?"]


def compare_reply(request) -> str:
    """Replies of random length (a little longer with more context), a few of them bad."""
    system = request[0]["content"] if request[0]["role"] == "system" else ""
    rng = random.Random(json.dumps(request))
    n = 1 + rng.randrange(6) + (1 if "-----" in system else 0)
    text = " ".join(f"Point {i}: {' '.join(rng.sample(WORDS, 4))}." for i in range(n))
    kind = rng.random()
    if kind < 0.15:
        return " Sure. What do you mean?"
    if kind < 0.3:
        return f" {text} User: thanks."
    return " " + text


def _compare_stage(prompt_file, **kw):
    return {"stage": "compare", "prompts": str(prompt_file),
            "configurations": [{"name": "hhh2", "system": "hhh", "shots": 2}, {"name": "plain", "system": "preamble"},
                               {"name": "none"}, {"name": "small", "model": "m-small"}],
            "rubric": [["hhh2"], ["plain", "small"], ["none"]], **kw}


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_compare_end_to_end_on_tiny_llama(tmp_path, tiny_engine):
    path = _prompt_file(tmp_path)
    stage = {"stage": "compare", "prompts": str(path), "sampling": {"max_new_tokens": 12},
             "configurations": [{"name": "hhh1", "system": "hhh", "shots": 1},
                                {"name": "preamble", "system": "preamble"},
                                {"name": "bare"}],
             "rubric": [["hhh1"], ["preamble"], ["bare"]]}
    ctx, (config,) = make_ctx(tmp_path, [stage], {"tiny:llama": tiny_engine}, model="tiny:llama", max_prompts=3)
    folder = tmp_path / "01-compare"
    summary = cmp.run(ctx, config, folder)
    responses = read_jsonl(folder / "responses.jsonl")
    assert len(responses) == 3 * 3 and len({(r["prompt_id"], r["config"]) for r in responses}) == 9
    assert all(r["meta"]["sampling"]["max_new_tokens"] == 12 and r["meta"]["configuration"] == r["config"]
               for r in responses)
    rows = read_jsonl(folder / "rows.jsonl")
    assert len(rows) == summary["pairs"] == 3 * 3  # 3 tiers of one: 3 pairs per prompt
    for r in rows:
        assert {"prompt", "chosen", "rejected", "chosen_config", "rejected_config", "kept", "dropped_by",
                "bad_response",
                "length_filter", "post_validation"} <= r.keys()
        assert r["chosen_tier"] < r["rejected_tier"] and r["kept"] == (r["dropped_by"] is None)
    # a random tiny model writes junk: the rules drop (nearly) everything, and say why
    assert summary["kept"] == sum(r["kept"] for r in rows)
    assert summary["after_bad_response"] == sum(not r["bad_response"] for r in rows)
    assert json.loads((folder / "_done.json").read_text())["pairs"] == 9
    anchor, title, html = render_section(cmp.report_section({"label": "compare", "folder": folder, "summary": summary}))
    assert "Filter funnel" in html and "hhh1 &gt; bare" in html


def test_compare_rows_filters_and_report(tmp_path):
    engines = {"m-big": ScriptedEngine(compare_reply), "m-small": ScriptedEngine(compare_reply)}
    ctx, (config,) = make_ctx(tmp_path, [_compare_stage(_prompt_file(tmp_path))], engines)
    folder = tmp_path / "01-compare"
    summary = cmp.run(ctx, config, folder)
    rows = read_jsonl(folder / "rows.jsonl")
    assert len(engines["m-small"].seen) == 5 and len(engines["m-big"].seen) == 15
    assert len(rows) == 5 * 5  # tiers of 1, 2, 1: 1*2 + 1*1 + 2*1 pairs per prompt
    assert not any({r["chosen_config"], r["rejected_config"]} == {"plain", "small"} for r in rows)
    responses = read_jsonl(folder / "responses.jsonl")
    by_id = {r["id"]: r for r in responses}
    for r in rows:
        assert (by_id[r["chosen_id"]]["response"] == r["chosen"]
                and by_id[r["chosen_id"]]["config"] == r["chosen_config"])
        assert r["bad_response"] == cmp.bad_response_rules(r["chosen"])
        first = ("bad_response" if r["bad_response"] else "length_filter" if r["length_filter"]["drop"] else None)
        assert (r["dropped_by"] or "").split(":")[0] == (first or "")
    assert summary["pairs"] == 25 and summary["kept"] == sum(r["kept"] for r in rows)
    assert set(summary["dropped"]) == {"bad_response", "length_filter"}  # the scripted replies trip both
    assert summary["after_bad_response"] >= summary["after_length_filter"] == summary["kept"]
    assert summary["per_config_pair"]["hhh2 > none"]["pairs"] == 5
    assert sum(v["pairs"] for v in summary["per_config_pair"].values()) == 25
    _, _, html = render_section(cmp.report_section({"label": "compare", "folder": folder, "summary": summary}))
    assert "after bad response" in html and "hhh2 &gt; plain" in html and "Example kept pairs" in html
    # the same responses, the length filter off: rows rewritten from the stored responses, nothing generated
    ctx, (config,) = make_ctx(tmp_path, [_compare_stage(_prompt_file(tmp_path), length_filter=False)], engines)
    calls = sum(len(e.seen) for e in engines.values())
    off = cmp.run(ctx, config, folder)
    assert sum(len(e.seen) for e in engines.values()) == calls and off["generated_now"] == 0
    rows = read_jsonl(folder / "rows.jsonl")
    assert len(rows) == 25 and not any((r["dropped_by"] or "").startswith("length_filter") for r in rows)
    assert off["kept"] == summary["after_bad_response"] > summary["kept"]


def test_report_sections_of_a_stage_still_writing(tmp_path):
    """A half-written last line (the stage is running) is skipped; no rows yet, no section."""
    folder = tmp_path / "01-mine_prompts"
    folder.mkdir()
    assert mp.report_section({"label": "mine_prompts", "folder": folder}) is None
    assert cmp.report_section({"label": "compare", "folder": folder}) is None
    row = {"source": "mined", "prompt": "How do tides work?", "kept": True, "dropped": None}
    (folder / "rows.jsonl").write_text(json.dumps(row) + "\n" + '{"source": "mined", "pro')
    anchor, title, html = render_section(mp.report_section({"label": "mine_prompts", "folder": folder,
                                                            "summary": {"rounds": 1}}))
    assert "1 prompts mined from 1 candidates" in html and "How do tides work?" in html


def test_compare_killed_half_way_resumes_without_repeats(tmp_path):
    stage = _compare_stage(_prompt_file(tmp_path))
    whole = {"m-big": ScriptedEngine(compare_reply), "m-small": ScriptedEngine(compare_reply)}
    ctx, (config,) = make_ctx(tmp_path, [stage], whole)
    cmp.run(ctx, config, tmp_path / "whole")

    dying = {"m-big": ScriptedEngine(compare_reply, fail_after=6), "m-small": ScriptedEngine(compare_reply)}
    ctx, (config,) = make_ctx(tmp_path, [stage], dying)
    with pytest.raises(Boom):  # in the middle of a batch of the second configuration
        cmp.run(ctx, config, tmp_path / "killed")
    written = len(read_jsonl(tmp_path / "killed" / "responses.jsonl"))
    assert 0 < written < 20 and len(dying["m-big"].seen) == written + 1
    assert not (tmp_path / "killed" / "rows.jsonl").exists() and not (tmp_path / "killed" / "_done.json").exists()
    again = {"m-big": ScriptedEngine(compare_reply), "m-small": ScriptedEngine(compare_reply)}
    ctx, (config,) = make_ctx(tmp_path, [stage], again)
    cmp.run(ctx, config, tmp_path / "killed")
    made = [json.dumps(x) for e in again.values() for x in e.seen]
    assert len(made) == 5 * 4 - written and not set(made) & {json.dumps(x) for x in dying["m-big"].seen[:written]}
    responses = read_jsonl(tmp_path / "killed" / "responses.jsonl")
    assert len(responses) == len({r["id"] for r in responses}) == 20
    assert (sorted(map(json.dumps, responses))
            == sorted(map(json.dumps, read_jsonl(tmp_path / "whole" / "responses.jsonl"))))
    assert read_jsonl(tmp_path / "killed" / "rows.jsonl") == read_jsonl(tmp_path / "whole" / "rows.jsonl")


def test_compare_reads_mined_prompts(tmp_path):
    engines = {"m-big": ScriptedEngine(mining_reply)}
    mine = {**MINE, "seeds": _seeds(tmp_path), "target": 3}
    stage = _compare_stage("@mine_prompts")
    ctx, (mconf, cconf) = make_ctx(tmp_path, [mine, stage], engines)
    ctx.stage_dirs["mine_prompts"] = tmp_path / "01-mine_prompts"
    mp.run(ctx, mconf, tmp_path / "01-mine_prompts")
    ctx.engines[("m-big", "hf")] = ScriptedEngine(compare_reply)
    ctx.engines[("m-small", "hf")] = ScriptedEngine(compare_reply)
    summary = cmp.run(ctx, cconf, tmp_path / "02-compare")
    kept = [r["prompt"] for r in read_jsonl(tmp_path / "01-mine_prompts" / "rows.jsonl") if r["kept"]]
    assert summary["prompts"] == len(kept) == 4 + 3
    assert {r["prompt"] for r in read_jsonl(tmp_path / "02-compare" / "rows.jsonl")} == set(kept)


def test_post_validation_trains_scores_drops_and_is_reused(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    import selfalign.core.reward_training as pm

    engines = {"m-big": ScriptedEngine(compare_reply), "m-small": ScriptedEngine(compare_reply)}
    stage = _compare_stage(_prompt_file(tmp_path),
                           post_validation={"quantile": 1.0, "model": "tiny:llama",
                                            "train": {"lora": False, "lr": 1e-3, "max_length": 256, "max_steps": 2}})
    ctx, (config,) = make_ctx(tmp_path, [stage], engines)
    folder = tmp_path / "01-compare"
    summary = cmp.run(ctx, config, folder)
    record = json.loads((folder / "post_validation.json").read_text())
    assert (folder / "post_validation").is_dir() and record["result"]["model"].startswith(str(folder.resolve()))
    rows = read_jsonl(folder / "rows.jsonl")
    checked = [r for r in rows if r["post_validation"] is not None]
    assert len(checked) == summary["after_length_filter"] == len(record["margins"]) > 0
    # quantile 1.0: every pair the reward model ranks the wrong way round goes, and only those
    for r in checked:
        assert r["post_validation"]["drop"] == (r["post_validation"]["margin"] < 0) == (not r["kept"])
        if not r["kept"]:
            assert r["dropped_by"].startswith("post_validation:")
    assert summary["after_post_validation"] == summary["kept"] == sum(r["kept"] for r in rows)
    assert summary["post_validation"]["negative_margins"] == sum(not r["kept"] for r in checked)

    # a rerun over the same pairs reuses the trained model's scores; the quantile is applied to them again
    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(pm, "train_reward_model", no_training)
    planted = {pid: (-1.0 - i if i < 4 else 1.0) for i, pid in enumerate(record["margins"])}  # 4 negative margins
    (folder / "post_validation.json").write_text(json.dumps({**record, "margins": planted}))
    (folder / "_done.json").unlink()
    half = _compare_stage(_prompt_file(tmp_path), post_validation={**stage["post_validation"], "quantile": 0.5})
    ctx, (config,) = make_ctx(tmp_path, [half], engines)
    again = cmp.run(ctx, config, folder)
    rows = read_jsonl(folder / "rows.jsonl")
    dropped = [r for r in rows if (r["dropped_by"] or "").startswith("post_validation")]
    assert sorted(r["post_validation"]["margin"] for r in dropped) == [-4.0, -3.0]  # floor(0.5 * 4) most negative
    assert again["kept"] == summary["after_length_filter"] - 2 == again["after_post_validation"]


def test_trim_to_sentence_hand_cases():
    from selfalign.methods.almost.compare import reply_text, trim_to_sentence

    assert trim_to_sentence("First part. Second part is cut") == "First part."
    assert trim_to_sentence('He said "stop." Then he left and') == 'He said "stop."'
    assert trim_to_sentence("Really? Yes! And then") == "Really? Yes!"
    assert trim_to_sentence("no sentence end at all") == "no sentence end at all"
    assert trim_to_sentence("Version 2.5 is out and") == "Version 2.5 is out and"  # a decimal point is no end
    cut = {"response": "Done. More", "finish_reason": "length"}
    assert reply_text(cut, True) == "Done." and reply_text(cut, False) == "Done. More"
    assert reply_text({"response": "Done. More", "finish_reason": "stop"}, True) == "Done. More"


def test_make_pairs_uses_trimmed_replies():
    from selfalign.methods.almost.compare import make_pairs

    long_ok = "This is a complete and careful first sentence of the answer. Then it goes on and on without"
    responses = {("p", "good"): {"id": "a", "response": long_ok, "finish_reason": "length"},
                 ("p", "plain"): {"id": "b", "response": "short reply that never ends", "finish_reason": "stop"}}
    tiers = {"good": 0, "plain": 1}
    kept = make_pairs([("p", "q")], responses, tiers, 50, True, True, trim=True)[0]
    assert kept["kept"] and kept["chosen"].endswith("answer.") and kept["chosen_trimmed"]
    assert not kept["rejected_trimmed"] and kept["rejected_bad"]
    raw = make_pairs([("p", "q")], responses, tiers, 50, True, True, trim=False)[0]
    assert not raw["kept"] and raw["dropped_by"].startswith("bad_response")
