"""The shipped human-written assets: each claim their comments and READMEs make is checked here, so
an edit that breaks one (an exemplar the filters would drop, a principle no exemplar cites, two
"disjoint" prompt sets that share a prompt) fails a test rather than quietly teaching the model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from selfalign.core.assets_io import ASSETS, load_yaml_list
from selfalign.core.dedup import rouge_dedup, rouge_l, rouge_tokens
from selfalign.core.hhh_prompt import load_hhh_prompt
from selfalign.core.prompts import load_prompts
from selfalign.methods.almost import compare as cmp
from selfalign.methods.self_align import self_align as sa
from selfalign.methods.self_align import self_instruct as si

ROOT = Path(__file__).resolve().parent.parent
EXEMPLARS = load_yaml_list("builtin:self_align/exemplars.yaml", ("user", "thoughts", "answer"))
PRINCIPLES = load_yaml_list("builtin:self_align/principles.yaml", ("name", "text"))
TAGS = {"helpful", "honest", "harmless"}


def project_prompts() -> list[str]:
    """Every prompt the project ships as training input: seed tasks, ALMoST seeds, the quickstart
    prompts and the red-team seed questions."""
    refs = ("builtin:self_align/seed_tasks.yaml", "builtin:almost/seed_prompts.yaml", "builtin:quickstart")
    texts = [p.text for ref in refs for p in load_prompts(ref)]
    return texts + [k["seed_question"]
                    for k in load_yaml_list("builtin:self_align/redteam_types.yaml", ("seed_question",))]


# -- Self-Align exemplars -----------------------------------------------------------------------------
@pytest.mark.parametrize("ex", EXEMPLARS, ids=[e["id"] for e in EXEMPLARS])
def test_every_exemplar_passes_the_stage_filters(ex):
    """An answer shaped like an exemplar must be kept: else the model is shown one thing and trained
    on the opposite. The leak rule is checked against the *other* exemplars (an exemplar shares
    every run with itself)."""
    others = set().union(*(sa.word_ngrams(e["answer"] + " " + e["user"], sa.LEAK_NGRAM) for e in EXEMPLARS
                           if e is not ex))
    completion = f" {' '.join(ex['thoughts'].split())}\n\n{sa.ANSWER_TAG} {ex['answer'].strip()}"
    assert sa.verdict(completion, others)[2] is None
    assert "\n" not in ex["thoughts"].strip()  # the stage samples the thoughts as one line


def test_exemplars_cover_plain_tasks_and_cite_every_principle():
    assert sum(e.get("kind") == "task" for e in EXEMPLARS) >= 2
    thoughts = " ".join(e["thoughts"] for e in EXEMPLARS)
    longest_first = sorted((p["name"] for p in PRINCIPLES), key=len, reverse=True)
    cited = set()
    for name in longest_first:  # "Informative" inside "Balanced & Informative Perspectives" is not a citation
        if name in thoughts:
            cited.add(name)
            thoughts = thoughts.replace(name, " ")
    uncited = [p["name"] for p in PRINCIPLES if p["name"] not in cited]
    assert not uncited, f"no exemplar's thoughts cite {uncited}"


def test_principle_names_are_unique_and_exemplars_cite_only_real_ones():
    names = [p["name"] for p in PRINCIPLES]
    assert len(names) == len(set(names)) == 16


# -- the HHH prompt -----------------------------------------------------------------------------------
def test_hhh_dialogues_are_tagged_and_varied_in_length():
    dialogues = load_hhh_prompt()["dialogues"]
    assert {d.get("tag") for d in dialogues} == TAGS
    replies = [t["content"] for d in dialogues for t in d["turns"] if t["role"] == "assistant"]
    lengths = sorted(len(r.split()) for r in replies)
    assert lengths[0] <= 20 and sum(n <= 50 for n in lengths) >= 5  # short answers to short questions
    assert any(r.strip().endswith("?") and len(r.split()) <= 25 for r in replies)  # a clarifying question


def test_hhh_dialogues_do_not_repeat_a_training_prompt():
    users = [t["content"] for d in load_hhh_prompt()["dialogues"] for t in d["turns"] if t["role"] == "user"]
    for u in users:
        res = rouge_dedup([u], 0.5, existing=project_prompts())
        assert res.keep[0], f"{u!r} is close to a shipped prompt (ROUGE-L {res.score[0]:.2f})"


# -- seeds and filters --------------------------------------------------------------------------------
def test_hhh_lab_prompt_sets_are_disjoint():
    """The PMP corpus and the fine-tuning comparisons of selfalign/recipes/hhh_lab.yaml come from two prompt
    sets that must not share a prompt or a near copy (ROUGE-L > 0.7, the self-instruct rule)."""
    recipe = yaml.safe_load((ROOT / "selfalign" / "recipes" / "hhh_lab.yaml").read_text())
    refs = [s["prompts"] for s in recipe["stages"] if s.get("name") in ("pmp_corpus", "target")]
    assert len(refs) == 2 and refs[0] != refs[1]
    a, b = ([p.text for p in load_prompts(r)] for r in refs)
    close = [(x, y) for x in a for y in b if rouge_l(rouge_tokens(x), rouge_tokens(y)) > 0.7]
    assert not close


def test_the_text_only_filter_keeps_the_projects_own_prompts():
    rejected = [t for t in project_prompts() if si.UNDOABLE.search(t)]
    assert not rejected


@pytest.mark.parametrize("text, undoable", [
    ("Describe the picture above in detail", True),
    ("Draw a diagram of the water cycle", True),
    ("Create a logo for my bakery", True),
    ("Go to this website and summarize it", True),
    ("Summarize the attached file", True),
    ("Make a bar chart of these sales figures", True),
    ("Read https://example.com and list its headings", True),
    ("What shell command finds all files larger than 100 MB?", False),
    ("Explain how a map projection distorts area", False),
    ("Give me directions to go to the train station from the museum", False),
    ("What does Python's map function return?", False),
    ("Implement a linked list in C", False),
    ("Draw up a plan for a garden party", False),
])
def test_undoable_filter(text, undoable):
    assert bool(si.UNDOABLE.search(text)) is undoable


@pytest.mark.parametrize("answer, stock", [
    ("I'm sorry, but I can't help with that.", True),
    ("Sorry, I cannot do that.", True),
    ("As an AI language model, I have no opinions.", True),
    ("I apologize, but that is not possible.", True),
    ("I'm sorry to hear about your job. Here is what might help.", False),
    ("I can't see live scores, but the club's website will have it.", False),
    ("Logging into her account without permission is illegal, so that part is off the table.", False),
])
def test_refusal_filter_drops_stock_formulas_not_declines(answer, stock):
    assert sa.opens_with_refusal(answer) is stock


# -- compare's shots ----------------------------------------------------------------------------------
def test_balanced_shots_spread_over_tags_nest_and_follow_the_seed():
    dialogues = load_hhh_prompt()["dialogues"]
    three = cmp.balanced_shots(dialogues, 3, seed=0)
    assert {d["tag"] for d in three} == TAGS
    assert cmp.balanced_shots(dialogues, 1, seed=0) == three[:1]  # fewer shots: a subset of more
    assert cmp.balanced_shots(dialogues, 3, seed=0) == three  # seeded: the same every time
    assert len({tuple(d["id"] for d in cmp.balanced_shots(dialogues, 3, seed=s)) for s in range(8)}) > 1
    every = cmp.balanced_shots(dialogues, len(dialogues), seed=3)
    assert sorted(d["id"] for d in every) == sorted(d["id"] for d in dialogues)
    six = cmp.balanced_shots(dialogues, 6, seed=5)
    assert all(sum(d["tag"] == t for d in six) == 2 for t in TAGS)


def test_balanced_shots_without_tags():
    plain = [{"id": str(i), "turns": []} for i in range(4)]
    assert sorted(d["id"] for d in cmp.balanced_shots(plain, 4, seed=1)) == ["0", "1", "2", "3"]


# -- one spelling ---------------------------------------------------------------------------------------
BRITISH = re.compile(
    r"\b(neighbour\w*|colour\w*|favour\w*|organis\w*|realis(?:e|ed|es|ing|ation)\b|summaris\w*|apologis\w*|"
    r"recognis\w*|specialis\w*|generalis\w*|maths|metres?|centres?|travell\w*|practis\w*|"
    r"flatmate|holiday|autumn|whilst|programme)\b",
    re.I,
)


def test_assets_use_us_spelling():
    """One spelling throughout (US English): a small model copies whichever it sees."""
    found = []
    for path in sorted(ASSETS.rglob("*")):
        if path.suffix in (".yaml", ".txt") and "behaviour" not in path.relative_to(ASSETS).parts:
            found += [f"{path.name}: {m.group(0)}" for m in BRITISH.finditer(path.read_text(encoding="utf-8"))]
    assert not found
