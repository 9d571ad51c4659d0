"""`compare`: synthetic comparisons (ALMoST, Kim et al. 2023, §2.2).

The paper gets preference data without human labels from a rule of thumb: several *configurations*
of vanilla models answer every prompt, and a prior ranks them: a larger model beats a smaller one,
more in-context demonstrations beat fewer, a carefully written prompt beats a worse one. Here the
ranking is the recipe's `rubric`, a list of tiers, best first, each a list of configuration names
(configurations in the same tier are tied and make no pair):

    configurations:
      - {name: hhh3, system: hhh, shots: 3}      # HHH preamble + 3 example dialogues, one per tag
      - {name: hhh1, system: hhh, shots: 1}
      - {name: plain, system: preamble}          # a one-line assistant preamble, no dialogue
      - {name: small, model: "@other", system: preamble}
    rubric: [[hhh3], [hhh1], [plain, small]]

A configuration's context is its system text followed by `shots` dialogues of the HHH prompt
(selfalign/assets/hhh/prompt.yaml): a seeded choice spread evenly over the dialogues' tags (helpful,
honest, harmless; `balanced_shots`), so a 1- or 3-shot configuration is not all cooking and code,
rendered as a plain Human:/Assistant: transcript. The system is `none`, `preamble`
(selfalign/assets/almost/preamble.txt), `hhh` (the HHH prompt's own preamble; `shots` then defaults
to all 14 dialogues in file order, which makes exactly `--system hhh`), or any system reference
`selfalign.evals.common.resolve_system` accepts. Sampling: temperature 1.0, top-p 0.9 (the paper's);
`max_new_tokens` 256 is this project's choice.

Pairs: for every prompt, every two configurations in different tiers give one pair (chosen = the
better tier). A reply that stopped at `max_new_tokens` is first cut back to the end of its last full
sentence (`trim_incomplete`, on by default; the pair row records `chosen_trimmed`/`rejected_trimmed`):
otherwise the length cap, not the model, decides most verdicts of the "does not end with '.' or
'!'" rule (on the embedded 270M model with 96 tokens, 75 of 96 chosen replies). Then, in this
order, each pair is dropped by the first filter that rejects it:

1. `bad_response` (this project's reading of the paper's rules): the *chosen* response is bad when
   it is under 50 characters, ends with "?" or ":", does not end with "." or "!", or contains a
   role marker ("Human:", "User:" or "Assistant:" anywhere in the reply: the model writing the
   other side's turn or its own tag). The response is stripped of surrounding whitespace first and
   the rule is literal (a reply ending in `."` or a code fence is bad). A bad *rejected* response
   does not drop a pair (it is recorded as `rejected_bad`). Note that the engine already cuts a
   reply at a new line opening with "Human:", so that rule mostly catches markers mid-line.
2. `length_filter` (the paper's heuristic filter): per prompt, the mean and the *population*
   standard deviation of the character lengths of all its responses (every configuration, good or
   bad); a pair is dropped when its chosen response is shorter than the rejected one AND shorter
   than mean − std/2. Strict: a chosen exactly at mean − std/2 is kept. With only two
   configurations the rule reduces to "drop every pair whose chosen reply is the shorter one"
   (the shorter of two lengths is always below mean − std/2); it is meant for several.
3. `post_validation` (optional, off by default; the paper's "as-is RM post-validation", whose
   details are not published): a reward model is trained (`selfalign.core.reward_training.train_reward_model`) on
   the pairs that passed 1 and 2, scores them, and among the pairs it ranks the wrong way round
   (negative margin r_chosen − r_rejected) the `quantile` fraction with the most negative margins
   (floor of quantile × their number) is dropped. The model is kept in `post_validation/`.

Files: `responses.jsonl` holds one row per (prompt, configuration), appended batch by batch as the
responses are made; `rows.jsonl` holds one row per pair (prompt, chosen, rejected, chosen_config,
rejected_config, `kept`, `dropped_by`, and every filter's verdict), written whole (replacing any
earlier version) once all responses exist; a later `reward_model` stage reads it (`data: compare`)
and skips `kept: false`. Resuming: a rerun answers only the (prompt, configuration) pairs without a
response row; the pairs are a pure function of the responses; a finished post-validation
(`post_validation.json`) is reused when it was made from the same pairs and settings, and
otherwise trained again from the start.

Simplifications: one sample per (prompt, configuration); one seeded choice of demonstrations per
configuration for the whole run, not a new sample per prompt; the whole context is a system text,
not earlier chat turns.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator

from selfalign.core.assets_io import ASSETS
from selfalign.core.chat import ROLE_MARKER, render_plain
from selfalign.core.engines import Sampling
from selfalign.core.errors import SelfAlignError
from selfalign.core.generation import Job, generate_rows, open_rows
from selfalign.core.progress import console
from selfalign.core.recipe import StageConfig, Strict
from selfalign.core.reward_training import reward_training
from selfalign.core.store import RowStore, replace_rows, row_id
from selfalign.core.training import TrainSettings
from selfalign.evals.common import resolve_system

PREAMBLE_FILE = ASSETS / "almost" / "preamble.txt"
RESPONSES_FILE = "responses.jsonl"
PV_FILE = "post_validation.json"
FILTERS = ("bad_response", "length_filter", "post_validation")


class Configuration(Strict):
    """One way of prompting a vanilla model."""

    name: str = Field(..., min_length=1, description="the name the rubric ranks")
    model: str | None = Field(None, description="model reference (default: the stage's model); @stage allowed")
    system: str | None = Field(None,
                               description="none, preamble, hhh, or a system prompt reference "
                                           "(text, .txt, builtin:...)")
    shots: int | None = Field(None, ge=0,
                              description="HHH example dialogues after the system text (default: 14 with hhh, else 0)")


class PostValidation(Strict):
    """The as-is reward model that double-checks the rubric's pairs (settings: ALMoST's reward model)."""

    train: TrainSettings = Field(default_factory=reward_training,
                                 description="how the as-is reward model is trained (ALMoST's reward-model settings)")

    quantile: float = Field(0.1, gt=0, le=1,
                            description="drop this fraction of the negative-margin pairs, most negative first")
    model: str | None = Field(None, description="where the reward model starts (default: the stage's model)")


class Config(StageConfig):
    stage: str = "compare"
    prompts: str = Field("@mine_prompts",
                         description="@<stage> (an earlier stage's rows with `prompt`) or a prompt file")
    configurations: list[Configuration] = Field(..., min_length=2,
                                                description="the ways of prompting that answer every prompt")
    rubric: list[list[str] | str] = Field(...,
                                          description="tiers of configuration names, best first; names "
                                                      "in one tier are tied")
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.9, max_new_tokens=256))
    min_chars: int = Field(50, ge=0, description="a response under this many characters is bad (paper: 50)")
    trim_incomplete: bool = Field(True,
                                  description="cut a reply that hit max_new_tokens back to its last full sentence "
                                  "before the filters (else the length cap decides most BAD verdicts)")
    bad_filter: bool = Field(True, description="apply the BAD-response rules (verdicts are recorded either way)")
    length_filter: bool = Field(True, description="apply the heuristic length filter")
    post_validation: PostValidation | None = Field(None, description="as-is reward-model post-validation (off: null)")
    max_prompts: int | None = Field(None, ge=1)

    @field_validator("configurations")
    @classmethod
    def _unique_names(cls, value: list[Configuration]) -> list[Configuration]:
        names = [c.name for c in value]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"two configurations are named {dupes[0]!r}; names must be unique")
        return value

    @field_validator("rubric")
    @classmethod
    def _check_rubric(cls, value, info: ValidationInfo):
        tiers = [[t] if isinstance(t, str) else t for t in value]
        if "configurations" in info.data:  # else that field's own error is reported
            rank_by_rubric(tiers, [c.name for c in info.data["configurations"]])
        return tiers

    def human_inputs(self) -> list[tuple[str, str]]:
        out = []
        if not self.prompts.startswith("@"):
            from selfalign.core.prompts import prompt_file_text

            out.append((self.prompts, prompt_file_text(self.prompts)))
        for c in self.configurations:
            system = (c.system or "none").strip()
            if system == "preamble":
                out.append(("builtin:almost/preamble.txt", PREAMBLE_FILE.read_text(encoding="utf-8")))
            elif system == "hhh" or (c.shots or 0) > 0:  # any part of the HHH prompt counts as all of it
                out.append(("hhh", resolve_system("hhh")))
            if system not in ("none", "preamble", "hhh"):
                out.append((f"{self.label}.{c.name}.system", resolve_system(system)))
        return out


# -- the rubric (pure, unit-tested) -----------------------------------------------------------------
def rank_by_rubric(rubric: list[list[str]], names: list[str]) -> dict[str, int]:
    """Tier of every configuration (0 = best). Every name must exist and appear exactly once, and at
    least two tiers are needed (one tier makes no pair); errors say what is wrong."""
    tiers: dict[str, int] = {}
    for i, tier in enumerate(rubric):
        if not tier:
            raise ValueError(f"tier {i} is empty")
        for name in tier:
            if name not in names:
                raise ValueError(f"{name!r} (tier {i}) is not a configuration (configurations: {', '.join(names)})")
            if name in tiers:
                raise ValueError(f"{name!r} appears twice (tiers {tiers[name]} and {i}); put it in one tier")
            tiers[name] = i
    if missing := [n for n in names if n not in tiers]:
        raise ValueError(f"configuration {missing[0]!r} is not ranked; put it in a tier")
    if len(rubric) < 2:
        raise ValueError("needs at least two tiers (tied configurations make no pair)")
    return tiers


def rubric_pairs(tiers: dict[str, int]) -> list[tuple[str, str]]:
    """(better, worse) for every two configurations in different tiers, better tiers first."""
    order = sorted(tiers, key=lambda n: tiers[n])
    return [(a, b) for a, b in combinations(order, 2) if tiers[a] < tiers[b]]


# -- the filters (pure, unit-tested) ----------------------------------------------------------------
def bad_response_rules(text: str, min_chars: int = 50) -> list[str]:
    """Every bad-response rule `text` breaks (empty: a good response), in the order they are listed."""
    text = text.strip()
    broken = []
    if len(text) < min_chars:
        broken.append(f"under {min_chars} characters")
    if text.endswith(("?", ":")):
        broken.append(f"ends with {text[-1]!r}")
    if not text.endswith((".", "!")):
        broken.append("does not end with '.' or '!'")
    if m := ROLE_MARKER.search(text):
        broken.append(f"contains a role marker ({m.group(1)}:)")
    return broken


SENTENCE_END = re.compile(r"""[.!?]["')\]]*(?=\s|$)""")


def trim_to_sentence(text: str) -> str:
    """`text` up to the end of its last full sentence (., ! or ?, closing quotes/brackets kept);
    unchanged when it has none."""
    ends = list(SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].rstrip() if ends else text


def reply_text(response: dict, trim: bool) -> str:
    """The reply the filters and the pair use: trimmed to a full sentence if it was cut by the length cap."""
    text = response["response"]
    return trim_to_sentence(text) if trim and response.get("finish_reason") == "length" else text


def length_stats(lengths: list[int]) -> tuple[float, float]:
    """Mean and population standard deviation."""
    return statistics.fmean(lengths), statistics.pstdev(lengths)


def length_filter_drops(chosen: int, rejected: int, mean: float, std: float) -> bool:
    """The heuristic filter: drop when the chosen is shorter than the rejected and than mean − std/2."""
    return chosen < rejected and chosen < mean - std / 2


def post_validation_drops(margins: list[float], quantile: float) -> list[bool]:
    """Which pairs to drop: among those with a negative margin, the floor(quantile × their number)
    most negative (ties: the earlier pair first)."""
    negative = sorted((m, i) for i, m in enumerate(margins) if m < 0)
    drop = {i for _, i in negative[: math.floor(quantile * len(negative) + 1e-9)]}
    return [i in drop for i in range(len(margins))]


# -- contexts ---------------------------------------------------------------------------------------
def balanced_shots(dialogues: list[dict], k: int, seed: int | str) -> list[dict]:
    """`k` of the HHH dialogues, spread evenly over their tags (helpful, honest, harmless): the tags
    take turns in a seeded order, each giving its next dialogue in a seeded shuffle, so 3 shots
    show one of each. The choice for k is the first k of one fixed order, so a configuration with
    fewer shots sees a subset of one with more, as the rubric "more demonstrations beat fewer"
    assumes (ALMoST §2.2). A dialogue without a `tag` counts under "untagged"."""
    rng = random.Random(f"hhh-shots-{seed}")
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in dialogues:
        groups[str(d.get("tag") or "untagged")].append(d)
    tags = sorted(groups)
    rng.shuffle(tags)
    for tag in tags:
        rng.shuffle(groups[tag])
    order = [groups[t][i] for i in range(max(map(len, groups.values()), default=0)) for t in tags if i < len(groups[t])]
    return order[:k]


def configuration_context(c: Configuration, seed: int | str = 0) -> str | None:
    """The system text of a configuration: its system prompt, then `shots` HHH dialogues. All of
    them (`shots` unset, or as many as there are) come in the file's order, which makes `system:
    hhh` exactly `--system hhh`; fewer are a seeded, balanced choice (`balanced_shots`)."""
    from selfalign.core.hhh_prompt import SEPARATOR, load_hhh_prompt

    system = (c.system or "none").strip()
    hhh = load_hhh_prompt() if system == "hhh" or c.shots else None
    dialogues = []
    if hhh is not None:
        every = hhh["dialogues"]
        shots = len(every) if c.shots is None else c.shots
        if shots > len(every):
            raise SelfAlignError(f"configurations: {c.name}: shots is {shots}, but the HHH prompt has "
                                 f"{len(every)} dialogues")
        chosen = every if shots == len(every) else balanced_shots(every, shots, seed)
        dialogues = [render_plain(d["turns"], add_generation_prompt=False) for d in chosen]
    if system == "none":
        head = None
    elif system == "preamble":
        head = PREAMBLE_FILE.read_text(encoding="utf-8").strip()
    elif system == "hhh":
        head = hhh["preamble"].strip()
    else:
        head = resolve_system(system)
    parts = ([head] if head else []) + dialogues
    if not parts:
        return None
    # the same rendering as the HHH prompt itself: `system: hhh` with all dialogues is `--system hhh`
    return SEPARATOR.join(parts) + SEPARATOR.rstrip() if dialogues else parts[0]


def drop_reason(row: dict) -> str | None:
    """What dropped a pair, for counting: the rule for bad responses, else the filter's name."""
    why = row.get("dropped_by")
    if not why:
        return None
    return why if why.startswith("bad_response") else why.split(":")[0]


# -- the stage ------------------------------------------------------------------------------------
def _generate_responses(ctx, config: Config, prompts, setups, sampling, store: RowStore) -> tuple[dict, int]:
    """Answer every (prompt, configuration) without a row yet, one model after the other; returns
    {(prompt id, configuration name): response row} and how many were generated now."""
    responses, made = {}, 0
    for c, model, context in setups:
        head = [{"role": "system", "content": context}] if context else []
        jobs = [Job(pid, [*head, {"role": "user", "content": p}], {"prompt": p}) for pid, p in prompts]
        done = generate_rows(
            ctx, store, stage="compare", label=f"{config.label}: {c.name}", model=model, sampling=sampling, jobs=jobs,
            id_extra=c.name, meta=ctx.provenance(config, model, sampling, configuration=c.name),
            build_row=lambda job, _, out, c=c, model=model: {
                "prompt_id": job.key, "prompt": job.data["prompt"], "config": c.name, "model": model,
                "system": c.system,
                "shots": c.shots, "response": out.text.strip(), "finish_reason": out.finish_reason,
                "completion_tokens": out.completion_tokens})
        made += done.made
        responses.update({(job.key, c.name): rows[0] for job, rows in zip(jobs, done.per_job, strict=True)})
    return responses, made


def make_pairs(prompts, responses: dict[tuple[str, str], dict], tiers: dict[str, int], min_chars: int,
               use_length_filter: bool, use_bad_filter: bool = True, trim: bool = False) -> list[dict]:
    """Pair rows, with the bad-response and length verdicts; `kept`/`dropped_by` after those two.
    With `trim`, a reply cut by the length cap is first cut back to its last full sentence."""
    rows = []
    pairs = rubric_pairs(tiers)
    for pid, prompt in prompts:
        mine = {name: responses[(pid, name)] for name in tiers}
        text = {name: reply_text(r, trim) for name, r in mine.items()}
        mean, std = length_stats([len(t) for t in text.values()])
        for a, b in pairs:
            ch, rj = mine[a], mine[b]
            bad = bad_response_rules(text[a], min_chars)
            lc, lr = len(text[a]), len(text[b])
            short = length_filter_drops(lc, lr, mean, std)
            dropped = (f"bad_response: {bad[0]}" if bad and use_bad_filter else
                       f"length_filter: chosen {lc} < rejected {lr} and < mean - std/2 = {mean - std / 2:.1f}"
                       if use_length_filter and short else None)
            rows.append({
                "id": row_id("pair", ch["id"], rj["id"]), "prompt_id": pid, "prompt": prompt,
                "chosen": text[a], "rejected": text[b], "chosen_config": a, "rejected_config": b,
                "chosen_trimmed": text[a] != ch["response"], "rejected_trimmed": text[b] != rj["response"],
                "chosen_tier": tiers[a], "rejected_tier": tiers[b], "chosen_id": ch["id"], "rejected_id": rj["id"],
                "kept": dropped is None, "dropped_by": dropped,
                "bad_response": bad, "rejected_bad": bad_response_rules(text[b], min_chars),
                "length_filter": {"drop": short, "applied": use_length_filter, "chosen_chars": lc, "rejected_chars": lr,
                                  "mean": round(mean, 2), "std": round(std, 2), "threshold": round(mean - std / 2, 2)},
                "post_validation": None,
            })
    return rows


def _post_validate(ctx, config: Config, pv: PostValidation, rows: list[dict], folder: Path) -> dict:
    """Train the as-is reward model on the surviving pairs, score them, mark the drops. Returns its record."""
    from selfalign.core.reward_training import train_reward_model
    from selfalign.core.rewards import RewardModel

    alive = [r for r in rows if r["kept"]]
    record_file = folder / PV_FILE
    # what the scores depend on (not the quantile: changing it only re-reads the margins)
    key = row_id("post_validation", [r["id"] for r in alive],
                 {"model": pv.model, **pv.train.model_dump(exclude={"merge"})},
                 config.model, ctx.recipe.seed)
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    if not record or record.get("key") != key:
        base = ctx.model_for(config, pv.model)
        ctx.free_accelerator()
        result = train_reward_model(base, [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                           for r in alive], folder / "post_validation",
                                    pv.train, ctx.recipe.seed)
        rm = RewardModel(result["model"], max_length=pv.train.max_length)
        prompts = [r["prompt"] for r in alive]
        chosen = rm.score(prompts, [r["chosen"] for r in alive])
        rejected = rm.score(prompts, [r["rejected"] for r in alive])
        record = {"key": key, "base": base, "result": result,
                  "margins": {r["id"]: c - j for r, c, j in zip(alive, chosen, rejected, strict=True)}}
        tmp = record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(record_file)
    margins = [record["margins"][r["id"]] for r in alive]
    drops = post_validation_drops(margins, pv.quantile)
    for r, m, drop in zip(alive, margins, drops, strict=True):
        r["post_validation"] = {"margin": m, "drop": drop}
        if drop:
            r.update(kept=False, dropped_by=f"post_validation: margin {m:.3f}, in the most negative "
                                            f"{pv.quantile:g} of the negative margins")
    return record


def funnel(rows: list[dict]) -> dict:
    """Pairs in total and after each filter, and per (chosen > rejected) configuration pair."""
    out = {"pairs": len(rows)}
    left = len(rows)
    for name in FILTERS:
        left -= sum(1 for r in rows if (r.get("dropped_by") or "").startswith(name + ":"))
        out[f"after_{name}"] = left
    per: dict[str, dict] = defaultdict(lambda: {"pairs": 0, "kept": 0})
    for r in rows:
        key = f"{r['chosen_config']} > {r['rejected_config']}"
        per[key]["pairs"] += 1
        per[key]["kept"] += bool(r["kept"])
    out["per_config_pair"] = dict(per)
    return out


def run(ctx, config: Config, folder) -> dict:
    folder = Path(folder)
    tiers = rank_by_rubric(config.rubric, [c.name for c in config.configurations])
    prompts = ctx.stage_prompts(config)
    sampling = config.sampling.model_copy(update={"n": 1, "seed": config.sampling.seed or ctx.recipe.seed})
    setups = [(c, ctx.model_for(config, c.model), configuration_context(c, ctx.recipe.seed))
              for c in config.configurations]
    setups.sort(key=lambda s: s[1])  # one model after the other (stable: configuration order within a model)
    responses, made = _generate_responses(ctx, config, prompts, setups, sampling, open_rows(folder, RESPONSES_FILE))
    rows = make_pairs(prompts, responses, tiers, config.min_chars, config.length_filter, config.bad_filter,
                      config.trim_incomplete)
    pv_record = None
    if config.post_validation is not None:
        if any(r["kept"] for r in rows):
            pv_record = _post_validate(ctx, config, config.post_validation, rows, folder)
        else:
            console.print("  [yellow]note:[/] no pair survived the rules; post-validation skipped")
    store = replace_rows(folder, rows)  # derived from the responses: rewritten whole, never mixed with an older run's

    per_config = {}
    for c in config.configurations:
        mine = [reply_text(responses[(pid, c.name)], config.trim_incomplete) for pid, _ in prompts]
        per_config[c.name] = {"tier": tiers[c.name], "mean_chars": round(statistics.fmean(len(x) for x in mine), 1),
                              "bad": sum(bool(bad_response_rules(x, config.min_chars)) for x in mine)}
    flow = funnel(rows)
    summary = {"prompts": len(prompts), "configurations": len(config.configurations), "responses": len(responses),
               "generated_now": made, **{k: v for k, v in flow.items() if k != "per_config_pair"},
               "kept": sum(r["kept"] for r in rows),
               "dropped": dict(Counter(r["dropped_by"].split(":")[0] for r in rows if r["dropped_by"])),
               "bad_rules": dict(Counter(r["bad_response"][0] for r in rows if r["bad_response"])),
               "per_config_pair": flow["per_config_pair"], "per_config": per_config}
    if config.post_validation is None:
        summary.pop("after_post_validation")
    if pv_record is not None:
        summary["post_validation"] = {"reward_model": pv_record["result"]["model"],
                                      "train_loss": pv_record["result"].get("train_loss"),
                                      "negative_margins": sum(m < 0 for m in pv_record["margins"].values())}
    console.print(f"  {summary['kept']} of {len(rows)} pairs kept; dropped: {summary['dropped'] or 'none'}")
    store.mark_done(**summary)
    return summary


def report_section(stage: dict):
    """The filter funnel, pairs per configuration pair, and a few example pairs."""
    from selfalign.core.report_api import Bold, Heading, Section, Table, read_rows, short

    rows = read_rows(Path(stage["folder"]) / "rows.jsonl")  # a half-written last line is skipped
    if not rows:
        return None
    flow = funnel(rows)
    steps = [("pairs from the rubric", flow["pairs"])] + [
        (f"after {name.replace('_', ' ')}", flow[f"after_{name}"]) for name in FILTERS
        if name != "post_validation" or any(r.get("post_validation") is not None for r in rows)]
    dropped = Counter(drop_reason(r) for r in rows if r.get("dropped_by"))
    kept = [r for r in rows if r["kept"]]
    examples = random.Random(0).sample(kept, min(3, len(kept)))
    blocks = [Heading("Filter funnel"), Table(["step", "pairs"], [list(s) for s in steps], numeric=["pairs"])]
    if dropped:
        blocks += [Heading("Why pairs were dropped"),
                   Table(["filter: rule", "pairs"], [[k, n] for k, n in dropped.most_common()], numeric=["pairs"])]
    blocks += [Heading("Per configuration pair"),
               Table(["chosen > rejected", "pairs", "kept"], [[k, v["pairs"], v["kept"]]
                                                              for k, v in flow["per_config_pair"].items()],
                     numeric=["pairs", "kept"])]
    if examples:
        blocks += [Heading("Example kept pairs"),
                   Table(["prompt", "chosen", "rejected"],
                         [[short(r["prompt"], 160), [Bold(r["chosen_config"]), ": " + short(r["chosen"], 400)],
                           [Bold(r["rejected_config"]), ": " + short(r["rejected"], 400)]] for r in examples],
                         numeric=[])]
    return Section(f"stage-{stage['label']}", f"Synthetic comparisons ({stage['label']})", blocks)
