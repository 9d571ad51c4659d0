"""One self-contained HTML page for a run folder: what ran, what humans wrote, how the evals moved.

`build_report(run_dir)` reads what a run wrote (run.json, recipe.yaml, each stage folder's rows.jsonl,
results.json and any trainer_state.json) and changes none of it. It works on a run still in progress:
a missing file or a half-written line leaves its section out. Charts are inline PNGs drawn with
matplotlib's Agg canvas (no pyplot, no global backend switch); the page needs no network and no script.
"""

from __future__ import annotations

import base64
import html
import io
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from selfalign.core.errors import SelfAlignError
from selfalign.core.report_api import (
    Bold,
    Chart,
    Code,
    Facts,
    Heading,
    Items,
    Muted,
    Section,
    Table,
    Text,
    is_number,
    read_json,
    read_rows,
    short,
    wall_time,
)
from selfalign.core.store import DONE_FILE, ROWS_FILE

MAX_SAMPLES = 8
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px} nav a{margin-right:14px;color:#0969da;text-decoration:none}
h1{margin:0 0 4px;font-size:28px} h2{margin:0 0 12px;font-size:20px} h3{margin:18px 0 8px;font-size:16px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:10px;padding:18px 22px;margin:18px 0;overflow-x:auto}
table.compact .num{min-width:0}
.facts{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.fact{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:8px 14px}
.fact b{display:block;font-size:11px;color:#656d76;text-transform:uppercase;letter-spacing:.04em}
.big{font-size:34px;font-weight:700;color:#4C72B0} .muted{color:#656d76;font-size:13px;font-weight:400}
table{border-collapse:collapse;width:100%;margin:6px 0 12px;font-size:14px} th{background:#f6f8fa;font-weight:600}
th,td{border-bottom:1px solid #eaecef;padding:6px 10px;text-align:left;vertical-align:top}
tbody tr:nth-child(even) td{background:#fbfcfd}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.total td{font-weight:700;border-top:2px solid #d0d7de}
table.metrics{width:auto;min-width:60%} table.metrics .num{min-width:120px}
table.metrics td:first-child .muted{display:block;max-width:28em} .up{color:#1a7f37;font-weight:600}
.down{color:#cf222e;font-weight:600}
.cell{max-height:16em;overflow:auto;white-space:pre-wrap;word-break:break-word;
font:13px/1.45 ui-monospace,Menlo,Consolas,monospace}
table.samples{table-layout:fixed} table.samples td:first-child .cell{font:inherit}
code{background:#f6f8fa;padding:1px 5px;border-radius:4px}
img.chart{max-width:100%;height:auto;display:block;margin:8px 0} .grid{display:flex;flex-wrap:wrap;gap:12px}
.grid img.chart{max-width:560px}
"""


# -- reading -------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    """HTML-escape text from a run, showing control characters (invalid in HTML) as visible symbols."""
    def visible(m: re.Match) -> str:
        code = ord(m.group())
        return chr(0x2400 + code) if code < 0x20 else "\u2421" if code == 0x7F else "\ufffd"
    return html.escape(_CONTROL.sub(visible, str(value)))


_read_json, _read_rows, _is_num, _fmt_wall, _short = read_json, read_rows, is_number, wall_time, short


def load_run(run_dir: Path) -> dict:
    """run.json and recipe.yaml (either may be missing) and the stages in run order, each with its folder."""
    record = _read_json(run_dir / "run.json")
    record = record if isinstance(record, dict) else {}
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        recipe = None
    recipe = recipe if isinstance(recipe, dict) else {}
    entries = record.get("stages") if isinstance(record.get("stages"), dict) else {}
    entries = {k: v for k, v in entries.items() if isinstance(v, dict)}
    folders = sorted((p for p in run_dir.iterdir() if p.is_dir() and re.match(r"\d+-.", p.name)),
                     key=lambda p: (int(p.name.split("-")[0]), p.name))
    stages, used = [], set()
    for p in folders:
        label = next((k for k, e in entries.items() if e.get("folder") == p.name), p.name.split("-", 1)[1])
        entry, used = entries.get(label, {}), used | {label}
        stages.append(dict(label=label, folder=p, kind=entry.get("stage"), wall_s=entry.get("wall_s"),
                           summary=entry.get("summary"), done=(p / DONE_FILE).exists()))
    for label, entry in entries.items():
        if label not in used:
            stages.append(dict(label=label, folder=None, kind=entry.get("stage"), wall_s=entry.get("wall_s"),
                               summary=entry.get("summary"), done=False))
    engine = record.get("engine") or recipe.get("engine")
    return dict(name=record.get("name") or recipe.get("name") or run_dir.name,
                model=record.get("model") or recipe.get("model"),
                engine=engine.get("name") if isinstance(engine, dict) else engine,
                seed=record.get("seed", recipe.get("seed")), started_at=record.get("started_at"),
                inputs=[i for i in record.get("inputs") or [] if isinstance(i, dict)], stages=stages)


# -- charts --------------------------------------------------------------------------------------
def _png(fig: Figure, alt: str) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="chart" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _tidy(ax, grid: bool = True) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    if grid:
        ax.grid(axis="y", alpha=0.3)


def chart_wall_times(stages: list[dict]) -> str:
    timed = [s for s in stages if _is_num(s["wall_s"])]
    fig = Figure(figsize=(8, 0.45 * len(timed) + 1.0))
    ax = fig.add_subplot()
    ax.barh([s["label"] for s in timed], [s["wall_s"] for s in timed], height=0.6, color=PALETTE[0])
    ax.invert_yaxis()
    for i, s in enumerate(timed):
        ax.annotate(_fmt_wall(s["wall_s"]), (s["wall_s"], i), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=9)
    ax.set_xlabel("wall time (s)")
    ax.margins(x=0.15)
    _tidy(ax, grid=False)
    return _png(fig, "wall time per stage")


def chart_eval(name: str, labels: list[str], groups: dict[str, list[tuple[str, list, list | None]]]) -> str:
    """Grouped bars: one panel per metric group, one bar per eval stage and category (error bars from
    ci95_low/ci95_high)."""
    n_bars = sum(len(k) for k in groups.values()) * len(labels)
    fig = Figure(figsize=(min(12.0, max(5.5, 1.5 + 0.45 * n_bars)), 3.2))
    axes = fig.subplots(1, len(groups), squeeze=False,
                        gridspec_kw={"width_ratios": [len(k) for k in groups.values()]})[0]
    width = 0.8 / len(labels)
    for ax, (group, keys) in zip(axes, groups.items(), strict=True):
        for j, label in enumerate(labels):
            ys = [vals[j] if _is_num(vals[j]) else 0.0 for _, vals, _ in keys]
            err = [[max(0.0, y - ci[0][j]), max(0.0, ci[1][j] - y)] if ci and _is_num(ci[0][j]) and _is_num(ci[1][j])
                   else [0.0, 0.0] for y, (_, _, ci) in zip(ys, keys, strict=True)]
            bars = ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(keys))], ys, width * 0.95,
                          color=PALETTE[j % len(PALETTE)], label=label, yerr=list(zip(*err, strict=True)),
                          capsize=4 if any(map(any, err)) else 0, error_kw={"ecolor": "#444", "lw": 1})
            if len(keys) * len(labels) <= 12:
                ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_xticks(range(len(keys)), [k for k, _, _ in keys], rotation=20 if len(keys) > 4 else 0)
        if all(0 <= v <= 1 for _, vals, _ in keys for v in vals if _is_num(v)):
            ax.set_ylim(0, 1.08)
        ax.set_title(group, fontsize=10)
        _tidy(ax)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=min(4, len(labels)), frameon=False,
               fontsize=9)
    return _png(fig, f"{name}: before/after by category")


def chart_rewards(title: str, chosen: list[float], rejected: list[float]) -> str:
    fig = Figure(figsize=(6.2, 3.0))
    ax = fig.add_subplot()
    both = chosen + rejected
    n_bins = max(5, min(30, len(both) // 4))
    bins = [min(both) + (max(both) - min(both) or 1) * i / n_bins for i in range(n_bins + 1)]
    for values, name, color in ((chosen, "chosen", PALETTE[2]), (rejected, "rejected", PALETTE[3])):
        if values:
            mean = sum(values) / len(values)
            ax.hist(values, bins=bins, alpha=0.55, color=color, histtype="stepfilled",
                    label=f"{name} (mean {mean:.2f})")
            ax.axvline(mean, color=color, ls="--", lw=1.2)
    ax.set(xlabel="reward", ylabel="pairs")
    ax.set_title(title, fontsize=10, pad=22)
    ax.legend(frameon=False, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    _tidy(ax)
    return _png(fig, f"reward distribution: {title}")


def chart_training(title: str, log: list[dict]) -> str | None:
    """Loss (and any reward / KL series) against step, one panel each, from a trainer_state.json log_history."""
    panels: dict[str, list[str]] = {"loss": [], "reward": [], "kl": []}
    for key in dict.fromkeys(k for e in log for k, v in e.items() if _is_num(v)):
        if key.startswith("train_") or key == "step":
            continue
        panel = ("loss" if "loss" in key else "reward" if "reward" in key and not re.search(r"std|frac", key)
                 else "kl" if re.search(r"(^|[/_])kl($|[/_])", key) else None)
        if panel and len(panels[panel]) < 6:
            panels[panel].append(key)
    panels = {p: ks for p, ks in panels.items() if ks}
    if not panels:
        return None
    fig = Figure(figsize=(4.2 * len(panels) + 0.6, 3.2))
    for ax, (panel, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True):
        for key in keys:
            pts = [(e["step"], e[key]) for e in log if _is_num(e.get("step")) and _is_num(e.get(key))]
            ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) < 25 else None, ms=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(panel, fontsize=11)
        ax.legend(frameon=False, fontsize=8)
        _tidy(ax)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig, f"training curves: {title}")


# -- sections ------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else esc(v)


def _section(anchor: str, title: str, body: str) -> tuple[str, str, str]:
    return anchor, title, f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def section_header(run: dict) -> str:
    total = sum(s["wall_s"] for s in run["stages"] if _is_num(s["wall_s"]))
    facts = [("model", run["model"]), ("engine", run["engine"]), ("seed", run["seed"]),
             ("started", run["started_at"]), ("total wall time", _fmt_wall(total) if total else None),
             ("stages", len(run["stages"]))]
    cards = "".join(f'<div class="fact"><b>{k}</b>{esc(v)}</div>' for k, v in facts if v is not None)
    return f'<h1>{esc(run["name"])}</h1><div class="muted">selfalign run report</div><div class="facts">{cards}</div>'


def _brief_summary(summary: Any, max_items: int = 10) -> str:
    """The scalar facts of a stage's summary, paths shortened to their last two parts; nested
    detail (per-filter counts and the like) is left to the stage's own section."""
    if not isinstance(summary, dict):
        return ""
    out = []
    for k, v in summary.items():
        if isinstance(v, dict | list) or v is None:
            continue
        if isinstance(v, str) and "/" in v and len(v) > 40:
            v = "…/" + "/".join(v.rstrip("/").split("/")[-2:])
        out.append(f"{k}={_fmt(v) if isinstance(v, float) else v}")
    return ", ".join(out[:max_items]) + (f", … ({len(out) - max_items} more)" if len(out) > max_items else "")


def section_stages(run: dict) -> tuple | None:
    if not run["stages"]:
        return None
    rows = "".join(
        f'<tr><td class="num">{i}</td><td>{esc(s["label"])}</td><td>{esc(s["kind"] or "")}</td>'
        f'<td class="num">{_fmt_wall(s["wall_s"])}</td>'
        f'<td>{"done" if s["done"] or s["summary"] is not None else "unfinished"}</td>'
        f'<td>{esc(_brief_summary(s["summary"]))}</td></tr>'
        for i, s in enumerate(run["stages"], start=1))
    chart = chart_wall_times(run["stages"]) if sum(_is_num(s["wall_s"]) for s in run["stages"]) > 1 else ""
    return _section("stages", "What ran", '<table><thead><tr><th class="num">#</th><th>stage</th><th>type</th>'
                    '<th class="num">wall time</th><th>status</th><th>summary</th></tr></thead>'
                    f'<tbody>{rows}</tbody></table>{chart}')


def section_human_inputs(run: dict) -> tuple | None:
    """The supervision ledger (selfalign.core.ledger): words first, lines beside, outside data by rows."""
    from selfalign.core.ledger import NOT_COUNTED

    inputs = [i for i in run["inputs"] if i.get("kind") != "data"]
    data = [i for i in run["inputs"] if i.get("kind") == "data"]
    if not inputs and not data:
        return None
    lines = sum(i.get("lines") or 0 for i in inputs)
    words = sum(i.get("words") or 0 for i in inputs)
    rows = "".join(f'<tr><td><code>{esc(i.get("source", "?"))}</code></td><td class="num">{_fmt(i.get("words"))}</td>'
                   f'<td class="num">{_fmt(i.get("lines"))}</td></tr>' for i in inputs)
    extra = "".join(f'<tr><td><code>{esc(i.get("source", "?"))}</code></td><td>{esc(i.get("stage", ""))}</td>'
                    f'<td class="num">{_fmt(i.get("rows"))}</td></tr>' for i in data)
    extra = ('<div>Outside data given to stages (human-made, counted by rows):</div><table><thead><tr><th>file</th>'
             f'<th>stage</th><th class="num">rows</th></tr></thead><tbody>{extra}</tbody></table>') if data else ""
    return _section("human", "Human supervision", f'<div><span class="big">{words}</span> words ({lines} lines) of '
                    'human-written input (prompts, principles, exemplars, templates), each text counted once: '
                    'everything else the run made itself.</div>'
                    '<table><thead><tr><th>input</th><th class="num">words</th><th class="num">lines</th></tr></thead>'
                    f'<tbody>{rows}<tr class="total"><td>total</td><td class="num">{words}</td>'
                    f'<td class="num">{lines}</td></tr></tbody></table>{extra}'
                    f'<p class="muted">Not counted: {esc(NOT_COUNTED)}.</p>')


def _metric_rows(evs: list[dict]) -> dict[tuple[str, str], list]:
    """(group, category) -> one value per eval stage; groups keep the order they first appear in."""
    rows: dict[tuple[str, str], list] = {}
    for j, ev in enumerate(evs):
        metrics = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else {}
        for g, m in metrics.items():
            for k, v in m.items() if isinstance(m, dict) else [("", m)]:
                if _is_num(v):
                    rows.setdefault((g, k), [None] * len(evs))[j] = v
    return rows


def _counts_note(cols: list[tuple[dict, dict]]) -> str:
    counts = [", ".join(f"{k} {v}" for k, v in (ev.get("counts") or {}).items()) for _, ev in cols]
    same = len(set(counts)) == 1
    text = counts[0] if same else "; ".join(f"{s['label']}: {c}" for (s, _), c in zip(cols, counts, strict=True))
    return f'<p class="muted">n: {esc(text)}</p>' if any(counts) else ""


def _change(key: str, first: Any, last: Any) -> str:
    if not (_is_num(first) and _is_num(last)):
        return ""
    d = last - first
    good = d < 0 if key in ("losses", "ties") else d > 0
    text = f"{d:+d}" if isinstance(d, int) else f"{d:+.3f}"
    return f'<span class="{"up" if good else "down" if d else ""}">{text}</span>'


def table_eval(name: str, cols: list[tuple[dict, dict]], rows: dict[tuple[str, str], list]) -> str:
    many = len(cols) > 1
    head = "".join(f'<th class="num">{esc(s["label"])}<br><span class="muted">{esc(ev.get("model") or "")}'
                   + (f'<br>system: {esc(_short(ev.get("system_name") or ev["system"]))}' if ev.get("system")
                      else "") + "</span></th>"
                   for s, ev in cols)
    body, last_group = [], None
    for (group, key), vals in rows.items():
        shown = "" if group in (last_group, name) else esc(group)
        last_group = group
        body.append(f"<tr><td>{shown}</td><td>{esc(key)}</td>"
                    + "".join(f'<td class="num">{_fmt(v)}</td>' for v in vals)
                    + (f'<td class="num">{_change(key, vals[0], vals[-1])}</td>' if many else "") + "</tr>")
    return (f'<table class="metrics"><thead><tr><th>metric</th><th>category</th>{head}'
            + ('<th class="num">change</th>' if many else "") + f'</tr></thead><tbody>{"".join(body)}</tbody></table>')


def section_evals(found: list[tuple[dict, dict]]) -> tuple | None:
    names = list(dict.fromkeys(n for _, res in found for n, ev in res["evals"].items() if isinstance(ev, dict)))
    parts = []
    for name in names:
        cols = [(s, {k: res.get(k) for k in ("model", "system", "system_name")} | res["evals"][name])
                for s, res in found if isinstance(res["evals"].get(name), dict)]
        rows = _metric_rows([ev for _, ev in cols])
        if not rows:
            continue
        groups: dict[str, list] = {}
        for (group, key), vals in rows.items():
            if key not in ("ci95_low", "ci95_high") and all(isinstance(v, float) for v in vals if v is not None):
                ci = (rows.get((group, "ci95_low")), rows.get((group, "ci95_high")))
                groups.setdefault(group, []).append((key or group, vals,
                                                     ci if all(ci) and not groups.get(group) else None))
        chart = chart_eval(name, [s["label"] for s, _ in cols], groups) if groups else ""
        parts.append(f"<h3>{esc(name)}</h3>{table_eval(name, cols, rows)}{_counts_note(cols)}{chart}")
    if not parts:
        return None
    return _section("evals", "Evaluations", '<p class="muted">One column per evaluation stage, in run order; '
                    'change is last column minus first. Bars: same numbers, before/after.</p>' + "".join(parts))


def section_rewards(found: list[tuple[dict, dict]]) -> tuple | None:
    charts = []
    for s, res in found:
        for name, ev in res["evals"].items():
            rw = ev.get("rewards") if isinstance(ev, dict) else None
            if isinstance(rw, dict):
                chosen = [v for v in rw.get("chosen") or [] if _is_num(v)]
                rejected = [v for v in rw.get("rejected") or [] if _is_num(v)]
                if chosen or rejected:
                    charts.append(chart_rewards(f"{s['label']} · {name}", chosen, rejected))
    return _section("rewards", "Reward distributions", f'<div class="grid">{"".join(charts)}</div>') if charts else None


def _trainer_states(folder: Path) -> list[Path]:
    """A stage's trainer_state.json files; checkpoint copies only when there is no final one (then the latest)."""
    found = sorted(folder.rglob("trainer_state.json"))
    final = [p for p in found if not any(part.startswith("checkpoint-") for part in p.relative_to(folder).parts)]
    step = lambda p: max([int(x) for x in re.findall(r"checkpoint-(\d+)", str(p))] or [0])  # noqa: E731
    return final or sorted(found, key=step)[-1:]


MIN_CURVE_POINTS = 5  # fewer logged steps than this make a table: two dots joined by a line are no curve


def has_curve(log: list[dict]) -> bool:
    """Whether some logged series has enough steps to be drawn as a curve."""
    steps: dict[str, int] = {}
    for e in log:
        if _is_num(e.get("step")):
            for k, v in e.items():
                if _is_num(v) and k != "step" and not k.startswith("train_"):
                    steps[k] = steps.get(k, 0) + 1
    return max(steps.values(), default=0) >= MIN_CURVE_POINTS


def table_training(title: str, log: list[dict]) -> str | None:
    """The few logged steps as a small table (step, loss and reward/KL values)."""
    keys = [k for k in dict.fromkeys(k for e in log for k, v in e.items() if _is_num(v))
            if k != "step" and not k.startswith("train_") and re.search(r"loss|reward|kl", k)][:6]
    rows = [e for e in log if _is_num(e.get("step")) and any(_is_num(e.get(k)) for k in keys)]
    if not keys or not rows:
        return None
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = "".join("<tr><td>{}</td>{}</tr>".format(esc(e["step"]), "".join(f"<td>{_fmt(e.get(k))}</td>" for k in keys))
                   for e in rows)
    return (f'<p><b>{esc(title)}</b> <span class="muted">({len(rows)} logged step(s): too few for a curve)</span></p>'
            f"<table><thead><tr><th>step</th>{head}</tr></thead><tbody>{body}</tbody></table>")


def section_training(run: dict) -> tuple | None:
    charts = []
    for s in run["stages"]:
        for path in _trainer_states(s["folder"]) if s["folder"] else []:
            state = _read_json(path)
            log = [e for e in (state or {}).get("log_history") or [] if isinstance(e, dict)]
            title = f"{s['label']}/{path.relative_to(s['folder']).parent}".rstrip("/.")
            if log and (chart := (chart_training(title, log) if has_curve(log) else table_training(title, log))):
                charts.append(chart)
    return _section("training", "Training curves", "".join(charts)) if charts else None


def model_label(model: str | None, stage_of: dict[str, str]) -> str:
    """How a sample column names its model: `@engrave` for a model a stage of this run trained (its
    full path would overflow the column), the reference as written otherwise."""
    if not model:
        return ""
    path = Path(model)
    for parent in [path, *path.parents] if path.is_absolute() else []:
        if str(parent) in stage_of:
            return f"@{stage_of[str(parent)]}"
    return model


def section_samples(run: dict) -> tuple | None:
    gens = []
    for s in run["stages"]:
        rows = _read_rows(s["folder"] / ROWS_FILE) if s["folder"] else []
        by_prompt: dict[str, dict] = {}
        for r in rows:
            if "prompt_id" in r and "completion" in r and (r["prompt_id"] not in by_prompt or r.get("sample") == 0):
                by_prompt[r["prompt_id"]] = r
        if by_prompt:
            gens.append((s, by_prompt))
    if not gens:
        return None
    order = list(gens[0][1])
    shared = [p for p in order if all(p in g for _, g in gens)] or order
    stage_of = {str(s["folder"].resolve()): s["label"] for s in run["stages"] if s["folder"]}
    head = "".join(f'<th>{esc(s["label"])}<br><span class="muted">'
                   f'{esc(model_label((next(iter(g.values())).get("meta") or {}).get("model"), stage_of))}</span></th>'
                   for s, g in gens)
    body = []
    for pid in shared[:MAX_SAMPLES]:
        first = next(g[pid] for _, g in gens if pid in g)
        prompt = first.get("prompt") or (first.get("messages") or [{}])[-1].get("content", "")
        cells = "".join(f'<td><div class="cell">{esc(g[pid]["completion"]) if pid in g else "—"}</div></td>'
                        for _, g in gens)
        body.append(f'<tr><td><div class="cell">{esc(prompt)}</div></td>{cells}</tr>')
    note = (f"{min(len(shared), MAX_SAMPLES)} of {len(shared)} prompts"
            + (" shared by every stage" if len(gens) > 1 else ""))
    return _section("samples", "Samples", f'<p class="muted">{note}; first sample of each.</p><table class="samples">'
                    f'<colgroup><col style="width:22%"></colgroup><thead><tr><th>prompt</th>{head}</tr></thead>'
                    f'<tbody>{"".join(body)}</tbody></table>')


# -- what stages declare (selfalign.core.report_api) ------------------------------------------------
def _inline(value: Any) -> str:
    """One value in a paragraph or a table cell: numbers formatted, text escaped, Bold/Muted/Code marked."""
    if isinstance(value, Bold):
        return f"<b>{_inline(value.value)}</b>"
    if isinstance(value, Muted):
        return f'<span class="muted">{_inline(value.value)}</span>'
    if isinstance(value, Code):
        return f"<code>{esc(value.value)}</code>"
    if isinstance(value, list):  # a cell of several parts
        return "".join(_inline(v) for v in value)
    return _fmt(value)


def _numeric_column(table: Table, i: int) -> bool:
    if table.numeric is not None:
        return table.columns[i] in table.numeric
    values = [row[i] for row in table.rows if row[i] is not None]
    return bool(values) and all(is_number(v.value if isinstance(v, Bold) else v) for v in values)


def render_table(table: Table) -> str:
    num = [_numeric_column(table, i) for i in range(len(table.columns))]
    cls = lambda i: ' class="num"' if num[i] else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{esc(c)}</th>" for i, c in enumerate(table.columns))
    box = (lambda html_: f'<div class="cell">{html_}</div>') if table.style == "samples" else (lambda html_: html_)
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{box(_inline(v))}</td>" for i, v in enumerate(row)) + "</tr>"
                   for row in table.rows)
    style = f' class="{table.style}"' if table.style else ""
    cols = f'<colgroup><col style="width:{table.first_width}"></colgroup>' if table.first_width else ""
    return f"<table{style}>{cols}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_chart(chart: Chart) -> str:
    from matplotlib.ticker import NullLocator

    color = lambda i, s: PALETTE[(i if s.color is None else s.color) % len(PALETTE)]  # noqa: E731
    fig = Figure(figsize=chart.size)
    ax = fig.add_subplot()
    if chart.kind == "line":
        for i, s in enumerate(chart.series):
            ax.plot(s.x, s.y, marker="o", ms=4, color=color(i, s), linestyle="--" if s.dashed else "-", label=s.name)
        if chart.hline is not None:
            ax.axhline(chart.hline[0], color="#8C8C8C", linestyle=":", linewidth=1, label=chart.hline[1])
    elif chart.kind == "histogram":
        values = [v for s in chart.series for v in s.y]
        lo, hi = min(values), max(values)
        n_bins = max(5, min(30, len(values) // 4))
        bins = [lo + (hi - lo or 1) * i / n_bins for i in range(n_bins + 1)]
        for i, s in enumerate(chart.series):
            if s.y:
                ax.hist(s.y, bins=bins, alpha=0.55, color=color(i, s), histtype="stepfilled", label=s.name)
                if chart.mean_lines:
                    ax.axvline(sum(s.y) / len(s.y), color=color(i, s), ls="--", lw=1.2)
    else:  # barh: one bar a series, its first value, labelled with it
        ax.barh([s.name for s in chart.series], [s.y[0] for s in chart.series], height=0.55,
                color=[color(i, s) for i, s in enumerate(chart.series)])
        for y, s in enumerate(chart.series):
            ax.text(s.y[0], y, f" {s.y[0]:.3f}", va="center", fontsize=9)
    if chart.log_x:
        ax.set_xscale("log")
    if chart.xticks is not None:
        ax.set_xticks(chart.xticks, [f"{n:,}" for n in chart.xticks])
        ax.xaxis.set_minor_locator(NullLocator())
    if chart.xlabel:
        ax.set_xlabel(chart.xlabel)
    if chart.ylabel:
        ax.set_ylabel(chart.ylabel)
    if chart.title:
        ax.set_title(chart.title, fontsize=11)
    if chart.kind != "barh":
        ax.legend(frameon=False, fontsize=8)
    _tidy(ax, grid=chart.grid)
    if chart.kind == "line":
        fig.tight_layout()
    return _png(fig, chart.alt)


def render_block(block: Any) -> str:
    if isinstance(block, Heading):
        return f"<h3>{esc(block.text)}</h3>"
    if isinstance(block, Text):
        opening = '<p class="muted">' if block.muted else "<p>"
        return opening + "".join(_inline(p) for p in block.parts) + "</p>"
    if isinstance(block, Table):
        return render_table(block)
    if isinstance(block, Facts):
        cards = "".join(f'<div class="fact"><b>{esc(k)}</b>{esc(v)}</div>' for k, v in block.items if v is not None)
        return f'<div class="facts">{cards}</div>'
    if isinstance(block, Items):
        items = "".join(f'<li>{esc(i[0])} <span class="muted">{esc(i[1])}</span></li>' if isinstance(i, tuple)
                        else f"<li>{esc(i)}</li>" for i in block.items)
        return f"<h3>{esc(block.heading)}</h3><ul>{items}</ul>"
    if isinstance(block, Chart):
        return render_chart(block)
    raise TypeError("a report section holds Heading, Text, Table, Facts, Items or Chart blocks, not "
                    f"{type(block).__name__}")


def render_section(section: Section | tuple) -> tuple[str, str, str]:
    """(anchor, title, html) of a section a stage declared (a ready tuple passes through)."""
    if isinstance(section, tuple):
        return section
    return _section(section.anchor, section.title, "".join(render_block(b) for b in section.blocks))


def stage_sections(run: dict, stages: Mapping[str, Any]) -> list[tuple]:
    """Sections a stage module draws itself: `report_section(stage) -> (anchor, title, html) | None`.

    `stage` is the dict `load_run` makes (label, folder, kind, wall_s, summary, done). A stage that
    fails to draw its section is left out with a note on stderr; the rest of the report still renders.
    """
    out = []
    for s in run["stages"]:
        module = stages.get(s["kind"] or "")
        draw = getattr(module, "report_section", None)
        if draw is None or s["folder"] is None:
            continue
        try:
            section = draw(s)
            section = render_section(section) if section else None
        except Exception as exc:  # a half-written stage must not take the whole report down
            print(f"report: section of stage {s['label']} left out ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        if section:
            out.append(section)
    return out


def lead_sections(run: dict, stages: Mapping[str, Any]) -> list[tuple]:
    """Sections that answer the run's question before anything else: `report_lead(run) -> (anchor,
    title, html) | None` of a stage module (the eval stage's "Did it work?"); one that fails is left out."""
    out = []
    for kind in dict.fromkeys(s["kind"] for s in run["stages"] if s["kind"]):
        draw = getattr(stages.get(kind), "report_lead", None)
        if draw is None:
            continue
        try:
            section = draw(run)
            section = render_section(section) if section else None
        except Exception as exc:
            print(f"report: lead section of {kind} stages left out ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        if section:
            out.append(section)
    return out


def build_report(run_dir: str | Path, out: str | Path | None = None, *, stages: Mapping[str, Any]) -> Path:
    """Write a self-contained HTML report of a run folder (default `RUN/report.html`); return its path.
    `stages` maps a stage kind to its module, whose `report_section`/`report_lead` draw its own parts."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SelfAlignError(f"no run folder at {run_dir}", "pass the folder a `selfalign run` wrote (its --out)")
    run = load_run(run_dir)
    found = [(s, res) for s in run["stages"] if s["folder"] for res in [_read_json(s["folder"] / "results.json")]
             if isinstance(res, dict) and isinstance(res.get("evals"), dict)]
    sections = [x for x in (*lead_sections(run, stages), section_stages(run), section_human_inputs(run),
                            section_evals(found), section_rewards(found), *stage_sections(run, stages),
                            section_training(run), section_samples(run)) if x]
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<title>{esc(run["name"])} · selfalign report</title>'
            f'<link rel="icon" href="data:,"><meta name="viewport" content="width=device-width">'
            f'<style>{CSS}</style></head>'
            f'<body><main>{section_header(run)}<nav>{nav}</nav>{"".join(h for _, _, h in sections)}</main>'
            '</body></html>\n')
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8", errors="replace")
    return out
