"""`mine_prompts`: prompt mining (ALMoST, Kim et al. 2023, §2.1 "prompt mining").

The paper starts from a small human-written seed pool (about 100 prompts) and has the base model
write more, Self-Instruct style: each request shows 10 prompts drawn from the seeds and the prompts
mined so far, as a numbered list, and the model writes the next item. A new prompt is dropped when
its ROUGE-L F1 to anything already in the pool is >= 0.5 (inclusive, unlike Self-Align's > 0.7), or
when it is shorter than 30 or longer than 250 characters. Sampling: temperature 1.2, top-p 0.9, up
to 64 new tokens. These are the defaults here.

What this stage does, round by round: `requests_per_round` requests, each showing `shots` prompts
sampled (seeded by the recipe seed and the round) from the seeds + the prompts kept in earlier
rounds; the first line of each completion is the candidate; candidates are screened in request
order (length first, then ROUGE-L against the seeds, the earlier rounds and the candidates of the
same round kept before it). It stops when `target` prompts are kept (the recipe's `max_prompts`
lowers the target) or after `max_rounds`.

Files: `raw/rows.jsonl` holds every request and its completion, written batch by batch as they
finish; `rows.jsonl` holds one row per candidate (`prompt`, `kept`, `dropped` = why not, the
closest pool prompt and its ROUGE-L for a duplicate, the round and request, `meta`), appended when
its round is screened; the seeds come first (`source: seed`) when `include_seeds` is on. At the
end the file is made to hold exactly this run's rows (rows of an earlier attempt with other
filter settings are removed). A later
stage reads the kept ones with `prompts: "@mine_prompts"` (rows with a `prompt` and `kept: true`).

Resuming: the screening is a pure function of the raw completions, and the examples shown in
round r depend only on rounds before r, so a killed run regenerates exactly the requests that
have no raw row and appends the candidate rows that are missing; nothing is generated twice.

Simplifications: the listing wording is this project's; one prompt is parsed per completion (the
first line; 64 tokens rarely hold more); the last round may keep more than needed, and those past
the target are recorded as dropped ("beyond the target count"); the target default (500) is not
the paper's number.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from pydantic import Field

from selfalign.core.assets_io import asset_text, load_yaml_mapping
from selfalign.core.dedup import rouge_dedup
from selfalign.core.engines import Sampling
from selfalign.core.generation import Job, generate_rows, open_rows
from selfalign.core.progress import console
from selfalign.core.prompts import load_prompts
from selfalign.core.recipe import StageConfig
from selfalign.core.store import replace_rows, row_id

TEMPLATES_REF = "builtin:almost/templates.yaml"
TEMPLATES = load_yaml_mapping(TEMPLATES_REF, ("mining",))

NO_PROMPT = "no prompt in the completion"
TOO_SHORT = "too short"
TOO_LONG = "too long"
DUPLICATE = "ROUGE-L duplicate"
BEYOND_TARGET = "beyond the target count"


class Config(StageConfig):
    stage: str = "mine_prompts"
    seeds: str = Field("builtin:almost/seed_prompts.yaml",
                       description="seed prompts: a YAML list (strings or {prompt: ...}), a .txt (one a "
                                   "line) or .jsonl file")
    target: int = Field(500, ge=1, description="stop once this many mined prompts are kept (not a paper number)")
    max_rounds: int = Field(50, ge=1, description="at most this many rounds of requests")
    requests_per_round: int = Field(16, ge=1, description="requests per round; each yields at most one prompt")
    shots: int = Field(10, ge=1, description="prompts shown per request (paper: 10)")
    rouge_threshold: float = Field(0.5, gt=0, le=1,
                                   description="drop a prompt whose ROUGE-L to the pool is >= this (paper: 0.5)")
    min_chars: int = Field(30, ge=0, description="drop prompts shorter than this many characters (paper: 30)")
    max_chars: int = Field(250, ge=1, description="drop prompts longer than this many characters (paper: 250)")
    include_seeds: bool = Field(True, description="pass the seed prompts on as prompts too (rows with source: seed)")
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=1.2, top_p=0.9, max_new_tokens=64))

    def human_inputs(self) -> list[tuple[str, str]]:
        return [(self.seeds, "\n".join(load_seed_prompts(self.seeds))), (TEMPLATES_REF, asset_text(TEMPLATES_REF))]


# -- inputs and the request (this project's wording) ------------------------------------------------
def load_seed_prompts(ref: str) -> list[str]:
    """Seed prompts from any prompt file (`selfalign.core.prompts`: YAML list, .txt, .jsonl, builtin:...); each once."""
    return list(dict.fromkeys(" ".join(p.text.split()) for p in load_prompts(ref) if p.text))


def mining_request(examples: list[str]) -> str:
    """A numbered list of requests that the model continues with one more."""
    lines = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, start=1))
    return TEMPLATES["mining"].format(examples=lines, next=len(examples) + 1)


# -- parsing and filters (pure functions, unit-tested) ---------------------------------------------
def parse_mined(completion: str) -> str:
    """The candidate prompt: the first non-empty line of the completion, whitespace collapsed,
    surrounding quotes removed."""
    line = next((x for x in completion.strip().splitlines() if x.strip()), "")
    text = " ".join(line.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def length_verdict(text: str, min_chars: int, max_chars: int) -> str | None:
    """None if the length is within [min_chars, max_chars], else why not."""
    if not text:
        return NO_PROMPT
    if len(text) < min_chars:
        return TOO_SHORT
    if len(text) > max_chars:
        return TOO_LONG
    return None


def screen(candidates: list[str], pool: list[str], threshold: float, min_chars: int, max_chars: int) -> list[dict]:
    """Verdict per candidate, in order: {kept, dropped, rouge_l, closest}. A candidate is checked
    against the pool and against the candidates kept before it (ROUGE-L >= threshold drops it)."""
    out = [{"kept": False, "dropped": length_verdict(c, min_chars, max_chars), "rouge_l": None, "closest": None}
           for c in candidates]
    ok = [i for i, v in enumerate(out) if v["dropped"] is None]
    res = rouge_dedup([candidates[i] for i in ok], threshold, existing=pool, inclusive=True)
    everything = list(pool) + [candidates[i] for i in ok]
    for i, keep, match, score in zip(ok, res.keep, res.match, res.score, strict=True):
        out[i]["kept"] = keep
        if not keep:
            out[i].update(dropped=DUPLICATE, rouge_l=round(score, 4), closest=everything[match])
    return out


# -- the stage ------------------------------------------------------------------------------------
def run(ctx, config: Config, folder) -> dict:
    model = ctx.model_for(config)
    seeds = load_seed_prompts(config.seeds)
    target = ctx.max_prompts(config.target)
    sampling = config.sampling.model_copy(update={"n": 1, "seed": config.sampling.seed or ctx.recipe.seed,
                                                   "stop": list(dict.fromkeys([*config.sampling.stop, "\n"]))})
    meta = ctx.provenance(config, model, sampling)
    raw, out = open_rows(folder / "raw"), open_rows(folder)
    wanted: list[str] = []  # ids of this run's rows, in order
    if config.include_seeds:
        seed_rows = [{"id": row_id("prompt", s), "prompt": s, "source": "seed", "kept": True, "dropped": None}
                     for s in seeds]
        out.append(seed_rows)
        wanted += [r["id"] for r in seed_rows]

    mined: list[str] = []
    generated = rounds = 0
    # a row's verdict depends on these
    verdict_key = [config.rouge_threshold, config.min_chars, config.max_chars, target]
    for r in range(config.max_rounds):
        if len(mined) >= target:
            break
        rounds += 1
        rng = random.Random(f"{ctx.recipe.seed}-mine-{r}")
        pool = seeds + mined
        jobs = [Job((r, j), mining_request(rng.sample(pool, min(config.shots, len(pool)))), {"round": r, "request": j})
                for j in range(config.requests_per_round)]
        made = generate_rows(ctx, raw, stage="mine_prompts", label=f"{config.label}: round {r + 1}", model=model,
                             sampling=sampling, jobs=jobs, meta=meta,
                             build_row=lambda job, _, c: {**job.data, "request_text": job.request, "completion": c.text,
                                                          "finish_reason": c.finish_reason})
        generated += made.made
        ids = [rows[0]["id"] for rows in made.per_job]
        candidates = [parse_mined(rows[0]["completion"]) for rows in made.per_job]
        rows = []
        for j, (rid, cand, v) in enumerate(zip(ids, candidates, screen(candidates, pool, config.rouge_threshold,
                                                                       config.min_chars, config.max_chars),
                                               strict=True)):
            if v["kept"] and len(mined) >= target:
                v.update(kept=False, dropped=BEYOND_TARGET)
            if v["kept"]:
                mined.append(cand)
            rows.append({"id": row_id("mined", rid, verdict_key), "prompt": cand, "source": "mined", "kept": v["kept"],
                         "dropped": v["dropped"], "rouge_l": v["rouge_l"], "closest": v["closest"], "chars": len(cand),
                         "round": r, "request": j, "raw_id": rid, "meta": meta})
        out.append(rows)
        wanted += [row["id"] for row in rows]

    by_id = {row["id"]: row for row in out}
    out = replace_rows(folder, [by_id[i] for i in wanted])  # drops rows of a run with other settings, if any
    mine = [by_id[i] for i in wanted if by_id[i]["source"] == "mined"]
    summary = {"seeds": len(seeds) if config.include_seeds else 0, "mined": len(mined), "candidates": len(mine),
               "rounds": rounds, "prompts": sum(by_id[i]["kept"] for i in wanted), "generated_now": generated,
               "dropped": dict(Counter(row["dropped"] for row in mine if not row["kept"]))}
    console.print(f"  kept {len(mined)} of {len(mine)} mined prompts in {rounds} rounds; dropped: "
                  f"{summary['dropped'] or 'none'}")
    out.mark_done(**summary)
    return summary


def report_section(stage: dict):
    """Candidates kept and dropped (by reason), and a few mined prompts."""
    from selfalign.core.report_api import Items, Section, Table, Text, read_rows

    rows = [r for r in read_rows(Path(stage["folder"]) / "rows.jsonl") if r.get("source") == "mined"]
    if not rows:
        return None
    reasons = Counter("kept" if r["kept"] else r["dropped"] for r in rows)
    kept = [r["prompt"] for r in rows if r["kept"]]
    dups = [r for r in rows if r["dropped"] == DUPLICATE][:3]
    blocks = [Text([f"{len(kept)} prompts mined from {len(rows)} candidates "
                    f"({(stage.get('summary') or {}).get('rounds', '?')} rounds)."]),
              Table(["verdict", "candidates"], [[k, n] for k, n in reasons.most_common()])]
    if kept:
        blocks.append(Items("Some mined prompts", random.Random(0).sample(kept, min(8, len(kept)))))
    if dups:
        blocks.append(Items("Some near-duplicates dropped",
                            [(r["prompt"], f"(ROUGE-L {r['rouge_l']:.2f} to: {r['closest']})") for r in dups]))
    return Section(f"stage-{stage['label']}", f"Prompt mining ({stage['label']})", blocks)
