"""The answer a report leads with: did alignment make the model better? (issue #13)

Compares the run's first eval stage ("base") with its last ("final"), item by item:

- behaviour rates, each with its Wilson 95% interval for base and final, and the change with a
  paired bootstrap interval over the held-out prompts;
- likelihood evals (HHH, TruthfulQA MC1, the capability battery), each change with a paired
  bootstrap 95% interval over the items both stages scored.

A change counts as real only when its interval excludes zero; each metric gets a one-line verdict,
and when nothing improved for real the section says so in a sentence. Then a few held-out prompts
with the base and final answers side by side, so a reader sees what the rates mean.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfalign.evals.behaviour import HIGHER_IS_BETTER, KINDS, MEANING, METRICS, HeldoutPrompt, judge
from selfalign.evals.stats import is_real, paired_bootstrap, wilson

# (eval, row field, filter on rows, label, headline?)
LIKELIHOOD_METRICS = [
    ("hhh", "correct", {"scoring": "likelihood"}, "HHH accuracy (likelihood, summed; headline)"),
    ("hhh", "correct_norm", {"scoring": "likelihood"}, "HHH accuracy (likelihood per character)"),
    ("hhh", "correct", {"scoring": "ab"}, "HHH accuracy (A/B, both orders)"),
    ("truthfulqa", "mc1", {}, "TruthfulQA MC1 (headline)"),
    ("truthfulqa", "mc1_norm", {}, "TruthfulQA MC1 (per character)"),
    ("capability", "correct", {}, "capability battery accuracy (summed; headline)"),
    ("capability", "correct_norm", {}, "capability battery accuracy (per character)"),
]
SAMPLE_PROMPTS = 4


def _rows(folder: Path, name: str) -> list[dict]:
    path = folder / name / "rows.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "item" in row:
            out.append(row)
    return out


def _results(folder: Path) -> dict:
    try:
        res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return res if isinstance(res, dict) else {}


def paired(base: list[dict], final: list[dict], field: str, where: dict) -> tuple[list[float], list[float]]:
    """The field's values of the items both stages scored (matched by item id), base and final."""
    def pick(rows):
        return {r["item"]: float(r[field]) for r in rows
                if field in r and all(r.get(k) == v for k, v in where.items())}
    b, f = pick(base), pick(final)
    common = [k for k in b if k in f]
    return [b[k] for k in common], [f[k] for k in common]


def verdict_line(change: dict, higher_is_better: bool = True) -> str:
    if not is_real(change):
        return "no significant change"
    better = (change["delta"] > 0) == higher_is_better
    return "better" if better else "worse"


def likelihood_changes(base: Path, final: Path) -> list[dict]:
    """One entry per likelihood metric both stages have: base, final, change with its interval."""
    out = []
    for name, field, where, label in LIKELIHOOD_METRICS:
        if name == "hhh" and where.get("scoring") == "ab" and any(
                _results(f).get("evals", {}).get("hhh", {}).get("ab_stuck") for f in (base, final)):
            out.append({"label": label, "skipped": "a model is stuck on one letter, so A/B says nothing"})
            continue
        b, f = paired(_rows(base, name), _rows(final, name), field, where)
        if not b:
            continue
        change = paired_bootstrap(b, f)
        out.append({"label": label, "base": sum(b) / len(b), "final": sum(f) / len(f), "change": change,
                    "verdict": verdict_line(change)})
    return out


def _judged(folder: Path) -> dict[str, dict]:
    """Behaviour rows by item, judged again from their stored answers (today's rules)."""
    out = {}
    for r in _rows(folder, "behaviour"):
        item = HeldoutPrompt(r["item"], r.get("kind", ""), r.get("prompt", ""))
        out[r["item"]] = r | {"judged": judge(item, r.get("answer", ""), r.get("finish_reason", ""),
                                              r.get("stop_string"))}
    return out


def behaviour_changes(base: Path, final: Path) -> list[dict]:
    base_rows, final_rows = _judged(base), _judged(final)
    common = [k for k in base_rows if k in final_rows]
    out = []
    for metric in METRICS:
        pairs = [(base_rows[k]["judged"].get(metric), final_rows[k]["judged"].get(metric)) for k in common]
        pairs = [(float(b), float(f)) for b, f in pairs if b is not None and f is not None]
        if not pairs:
            continue
        b, f = [p[0] for p in pairs], [p[1] for p in pairs]
        change = paired_bootstrap(b, f)
        out.append({"label": metric, "base": sum(b) / len(b), "final": sum(f) / len(f), "n": len(b),
                    "base_ci": wilson(sum(b), len(b)), "final_ci": wilson(sum(f), len(f)), "change": change,
                    "verdict": verdict_line(change, metric in HIGHER_IS_BETTER)})
    return out


def side_by_side(base: Path, final: Path, n: int = SAMPLE_PROMPTS) -> list[tuple[dict, dict]]:
    """A few held-out prompts, one of each kind first, with both answers."""
    base_rows = {r["item"]: r for r in _rows(base, "behaviour")}
    final_rows = {r["item"]: r for r in _rows(final, "behaviour")}
    common = [k for k in base_rows if k in final_rows]
    chosen: list[str] = []
    for kind in KINDS:
        chosen += [k for k in common if base_rows[k].get("kind") == kind][:1]
    chosen += [k for k in common if k not in chosen]
    return [(base_rows[k], final_rows[k]) for k in chosen[:n]]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _interval(change: dict, scale: float = 100) -> str:
    return f"{change['delta'] * scale:+.1f} [{change['low'] * scale:+.1f}, {change['high'] * scale:+.1f}]"


def lead_section(base_label: str, final_label: str, base: Path, final: Path):
    """The "Did it work?" section (a `selfalign.core.report_api.Section`), or None with nothing to compare."""
    from selfalign.core.report_api import Bold, Heading, Muted, Section, Table, Text

    beh = behaviour_changes(base, final)
    lik = likelihood_changes(base, final)
    if not beh and not lik:
        return None
    blocks = [Text([f"base: {base_label} · final: {final_label}. Changes are final − base in percentage points with "
                    "a paired bootstrap 95% interval (2,000 resamples, seeded); a change is called real only when its "
                    "interval excludes zero. Rates carry Wilson 95% intervals."], muted=True)]
    real_gain = False
    numbers = ["base", "final", "change (pp)", "n"]
    if beh:
        real_gain |= any(m["verdict"] == "better" for m in beh)
        rows = [[[m["label"], Muted(MEANING.get(m["label"], ""))],
                 [_pct(m["base"]), " ", Muted(f"[{_pct(m['base_ci'][0])}, {_pct(m['base_ci'][1])}]")],
                 [_pct(m["final"]), " ", Muted(f"[{_pct(m['final_ci'][0])}, {_pct(m['final_ci'][1])}]")],
                 _interval(m["change"]), m["verdict"], m["n"]] for m in beh]
        blocks += [Heading("Behaviour on held-out prompts"),
                   Table(["rate", "base", "final", "change (pp)", "verdict", "n"], rows, numeric=numbers,
                         style="metrics"),
                   Text(["Higher is better for clean_stop, declines and admits_unknown; lower for the rest. Keyword "
                         "judgements see surface form only (see evals/behaviour.py)."], muted=True)]
    if lik:
        rows = []
        for m in lik:
            if "skipped" in m:
                rows.append([m["label"], Muted(m["skipped"]), "", "", "", ""])
                continue
            real_gain |= m["verdict"] == "better"
            rows.append([m["label"], _pct(m["base"]), _pct(m["final"]), _interval(m["change"]), m["verdict"],
                         m["change"]["n"]])
        blocks += [Heading("Likelihood evals"),
                   Table(["metric", "base", "final", "change (pp)", "verdict", "n"], rows, numeric=numbers,
                         style="metrics")]
    if not real_gain:
        blocks.insert(1, Text([Bold("No significant gain: no metric improved with an interval that excludes zero. "
                                    "At this scale, this run's method did not measurably make the model better.")]))
    samples = side_by_side(base, final)
    if samples:
        blocks += [Heading("Held-out prompts, side by side"),
                   Table(["prompt", "base", "final"],
                         [[[Muted(b.get("kind", "")), "\n" + b["prompt"]], b["answer"] or Muted("(empty)"),
                           f["answer"] or Muted("(empty)")] for b, f in samples],
                         numeric=[], style="samples", first_width="22%")]
    return Section("did-it-work", "Did it work?", blocks)


def report_lead(run: dict):
    """The report's first section (a `report_lead` hook of the eval stage): first vs last eval stage."""
    evals = [s for s in run["stages"] if s.get("kind") == "eval" and s.get("folder") is not None
             and (Path(s["folder"]) / "results.json").is_file()]
    if len(evals) < 2:
        return None
    base, final = evals[0], evals[-1]
    return lead_section(f"{base['label']} ({_results(base['folder']).get('model', '')})",
                        f"{final['label']} ({_results(final['folder']).get('model', '')})", Path(base["folder"]),
                        Path(final["folder"]))
