"""`self_instruct`: Topic-Guided Red-Teaming Self-Instruct (Self-Align, Sun et al. 2023, §3.1).

Two sources of prompts, both written by the base model itself:

1. Vanilla Self-Instruct. Each request shows `shots` instructions (5 in the paper) drawn from the
   human seed tasks and the instructions kept so far, as a numbered list; the model continues the
   list. New items pass light filters (length, no tasks a text model cannot do) and the ROUGE-L
   rule: an instruction whose ROUGE-L to any kept one (or a seed) is > 0.7 is dropped.
2. Topic-guided red-teaming (TGRT). For each adversarial question *type* (with one seed question),
   the model brainstorms topics, 10 a request over several rounds, deduplicated by exact match; then
   writes a question for every (type, topic) pair.

Sampling defaults follow the paper: temperature 1.0, top-p 0.98, up to 384 new tokens.

Resuming: every raw completion is a row in `raw/rows.jsonl`, keyed (by the generation driver) by its
step, round and request, the model, the sampling and the request's text;
what is kept is a pure function of those rows (parse → filter → dedup, in order), so a killed run
regenerates only missing requests, and the in-context examples of round r depend only on rounds
before r. Simplifications: the dedup of each round is recomputed over all candidates (fine up to
~10^5; the paper's 360k would want an incremental index); the prompt wording is this project's.
"""

from __future__ import annotations

import random
import re

from pydantic import Field

from selfalign.core.assets_io import asset_text, load_yaml_list, load_yaml_mapping
from selfalign.core.chat import ROLE_MARKER
from selfalign.core.dedup import rouge_dedup
from selfalign.core.engines import Sampling
from selfalign.core.generation import Job, generate_rows, open_rows
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig
from selfalign.core.store import replace_rows, row_id

# The templates and the text-only filter are human-written text, kept in an asset file that the
# supervision ledger counts (selfalign/core/ledger.py). UNDOABLE: tasks a text-only model cannot do.
# Self-Instruct filters on bare words ("file", "map", "image"); that also rejects doable tasks such as
# "what shell command finds all files larger than 100 MB", so each word only counts in a phrase that
# points at missing media or files, asks to make pictures or sound, or to visit a page.
TEMPLATES_REF = "builtin:self_align/templates.yaml"
TEMPLATES = load_yaml_mapping(TEMPLATES_REF, ("instruct", "topics", "question", "undoable"))
UNDOABLE = re.compile(TEMPLATES["undoable"]["pattern"].format(**TEMPLATES["undoable"]), re.I | re.X)


class Config(StageConfig):
    stage: str = "self_instruct"
    seed_tasks: str = Field("builtin:self_align/seed_tasks.yaml", description="seed instructions (YAML list)")
    redteam_types: str = Field("builtin:self_align/redteam_types.yaml", description="red-team question types")
    vanilla_target: int = Field(100, ge=0, description="stop vanilla self-instruct once this many are kept")
    max_rounds: int = Field(20, ge=1, description="at most this many vanilla rounds")
    requests_per_round: int = Field(8, ge=1)
    shots: int = Field(5, ge=1, description="instructions shown per request (paper: 5)")
    topic_rounds: int = Field(2, ge=0, description="topic brainstorming requests per red-team type")
    topics_per_type: int = Field(10, ge=1, description="most topics kept per type (paper asks 10 a request)")
    rouge_threshold: float = Field(0.7, gt=0, le=1,
                                   description="drop a prompt whose ROUGE-L to a kept one is above this")
    include_seeds: bool = Field(True, description="pass the seed tasks and seed questions on as prompts too")
    min_words: int = 3
    max_words: int = 150
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.98, max_new_tokens=384))

    def human_inputs(self) -> list[tuple[str, str]]:
        return [(ref, asset_text(ref)) for ref in (self.seed_tasks, self.redteam_types, TEMPLATES_REF)]


# -- prompts (this project's wording, in TEMPLATES) ------------------------------------------------
def instruct_prompt(examples: list[str]) -> str:
    lines = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, start=1))
    return TEMPLATES["instruct"].format(examples=lines, next=len(examples) + 1)


def topics_prompt(kind: dict, n: int) -> str:
    return TEMPLATES["topics"].format(type=kind["type"], description=kind["description"],
                                      seed_question=kind["seed_question"], n=n)


def question_prompt(kind: dict, topic: str) -> str:
    return TEMPLATES["question"].format(type=kind["type"], description=kind["description"],
                                        seed_question=kind["seed_question"], topic=topic)


# -- parsing and filters (pure functions, unit-tested) ---------------------------------------------
def parse_list_continuation(text: str) -> list[str]:
    """Items of a numbered list the model continued after "N.": split at "\\nM." markers, stop an
    item at a blank line, drop empty ones."""
    items = re.split(r"\n\s*\d{1,3}\s*[.)]\s*", text)
    out = []
    for item in items:
        item = item.split("\n\n")[0].strip()
        if item:
            out.append(re.sub(r"\s+", " ", item))
    return out


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def instruction_ok(text: str, min_words: int, max_words: int) -> str | None:
    """None if the instruction is usable, else why not."""
    n = len(text.split())
    if n < min_words:
        return "too short"
    if n > max_words:
        return "too long"
    if not text[0].isalpha():
        return "does not start with a letter"
    if UNDOABLE.search(text):
        return "needs something a text model cannot see or make"
    if ROLE_MARKER.search(text):
        return "contains a role marker"
    return None


# -- the stage ------------------------------------------------------------------------------------
def _vanilla_candidates(rounds: list[list[dict]]) -> list[tuple[int, str]]:
    """(round, instruction) of every parsed item, in round and request order."""
    return [(r, item) for r, rows in enumerate(rounds) for row in rows
            for item in parse_list_continuation(row["completion"])]


def run(ctx, config: Config, folder) -> dict:
    model = ctx.model_for(config)
    seeds = [s["instruction"].strip() + (f"\n{s['input'].strip()}" if s.get("input") else "")
             for s in load_yaml_list(config.seed_tasks, ("instruction",))]
    kinds = load_yaml_list(config.redteam_types, ("id", "type", "description", "seed_question"))
    raw = open_rows(folder / "raw")
    sampling = config.sampling.model_copy(update={"n": 1, "seed": config.sampling.seed or ctx.recipe.seed})
    meta = ctx.provenance(config, model, sampling)
    rejected: dict[str, int] = {}

    def generate(label: str, jobs: list[Job]) -> list[dict]:
        """The raw completion row of each job, in job order (the driver skips jobs already stored)."""
        made = generate_rows(ctx, raw, stage="self_instruct", label=label, model=model, sampling=sampling, jobs=jobs,
                             build_row=lambda job, _, c: {"prompt": job.request, "completion": c.text, **job.data},
                             meta=meta)
        return [rows[0] for rows in made.per_job]

    def kept_vanilla(rounds: list[list[dict]]) -> list[str]:
        cands = []
        for _, item in _vanilla_candidates(rounds):
            why = instruction_ok(item, config.min_words, config.max_words)
            if why:
                rejected[why] = rejected.get(why, 0) + 1
            else:
                cands.append(item)
        res = rouge_dedup(cands, config.rouge_threshold, existing=seeds)
        rejected["rouge-l duplicate"] = res.keep.count(False)
        return [c for c, k in zip(cands, res.keep, strict=True) if k]

    by_id = {k["id"]: k for k in kinds}
    topic_jobs = [Job(("topics", k["id"], r), topics_prompt(k, config.topics_per_type),
                      {"step": "topics", "type": k["id"], "round": r})
                  for k in kinds for r in range(config.topic_rounds)]
    topics: dict[str, list[str]] = {}

    def read_topics(topic_rows: list[dict]) -> list[Job]:
        """Fill `topics` from the topic rows; the question jobs, one per (type, topic)."""
        topics.update({k["id"]: [] for k in kinds})
        for row in topic_rows:
            for t in parse_list_continuation(row["completion"]):
                t = t.rstrip(".")
                if 0 < len(t.split()) <= 12 and t.lower() not in {x.lower() for x in topics[row["type"]]}:
                    topics[row["type"]].append(t)
        return [Job(("question", tid, t), question_prompt(by_id[tid], t), {"step": "question", "type": tid, "topic": t})
                for tid, ts in topics.items() for t in ts[: config.topics_per_type]]

    # The red-team requests depend on no vanilla round, so they ride in the vanilla rounds' batches:
    # the topic requests in round 1's, the questions (which need the topics) in round 2's. At these
    # batch sizes decoding is bound by reading the weights, so the extra rows cost little, and the
    # stage makes two decoding passes instead of four. Whatever did not ride goes alone afterwards.
    question_jobs: list[Job] | None = None
    question_rows: list[dict] | None = None

    # 1. vanilla self-instruct, round by round: round r's examples come from what rounds < r kept
    kept: list[str] = []
    rounds: list[list[dict]] = []
    for r in range(config.max_rounds + 1 if config.vanilla_target else 0):
        rejected.clear()
        kept = kept_vanilla(rounds)
        if len(kept) >= config.vanilla_target or r == config.max_rounds:
            break
        rng = random.Random(f"{ctx.recipe.seed}-{r}")
        pool = seeds + kept
        jobs = [Job(("instruct", r, j), instruct_prompt(rng.sample(pool, min(config.shots, len(pool)))),
                    {"step": "instruct", "round": r, "request": j}) for j in range(config.requests_per_round)]
        riders, what = ((topic_jobs, "red-team topics") if question_jobs is None
                        else (question_jobs, "red-team questions") if question_rows is None else ([], ""))
        made = generate(f"{config.label}: instructions round {r + 1}" + (f" and {what}" if riders else ""),
                        jobs + riders)
        rounds.append(made[: len(jobs)])
        if riders is topic_jobs:
            question_jobs = read_topics(made[len(jobs):])
        elif riders:
            question_rows = made[len(jobs):]
    kept = kept[: config.vanilla_target]

    # 2. red-team topics per type, then one question per (type, topic): what did not ride above
    if question_jobs is None:
        question_jobs = read_topics(generate(f"{config.label}: red-team topics", topic_jobs))
    if question_rows is None:
        question_rows = generate(f"{config.label}: red-team questions", question_jobs)
    questions = []
    for row in question_rows:
        q = first_line(row["completion"])
        if q and not instruction_ok(q, config.min_words, config.max_words):
            questions.append((q, row))

    # 3. one ROUGE-L pass over red-team questions against everything kept, then write the prompts
    res = rouge_dedup([q for q, _ in questions], config.rouge_threshold, existing=seeds + kept)
    rows = [{"id": row_id("prompt", p), "prompt": p, "source": "seed"}
            for p in (seeds + [k["seed_question"].strip() for k in kinds] if config.include_seeds else [])]
    rows += [{"id": row_id("prompt", p), "prompt": p, "source": "self_instruct"} for p in kept]
    rows += [{"id": row_id("prompt", q), "prompt": q, "source": "tgrt", "type": extra["type"], "topic": extra["topic"]}
             for (q, extra), k in zip(questions, res.keep, strict=True) if k]
    seen: set[str] = set()
    rows = [r for r in rows if not (r["id"] in seen or seen.add(r["id"]))]  # a prompt listed twice is kept once
    # derived from the raw rows: rewritten whole, so prompts of a run with other settings never linger
    out = replace_rows(folder, rows)
    summary = {"seeds": sum(r["source"] == "seed" for r in rows), "self_instruct": len(kept), "tgrt": sum(res.keep),
               "prompts": len(out), "topics": sum(len(v) for v in topics.values()),
               "dropped": {**rejected, "tgrt rouge-l duplicate": res.keep.count(False)}}
    console.print(f"  kept {summary['self_instruct']} self-instruct and {summary['tgrt']} red-team prompts")
    out.mark_done(**summary)
    return summary
