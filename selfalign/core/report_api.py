"""What a stage hands the run report: plain values, no HTML. `selfalign.core.report` draws them.

A stage module may define `report_section(stage) -> Section | None` (its own part of the report;
`stage` is the dict `report.load_run` makes: label, folder, kind, wall_s, summary, done), and the eval
stage defines `report_lead(run) -> Section | None` (the report's first section). A section is a title
and a list of blocks, drawn in order:

- `Heading`: a sub-heading;
- `Text`: a paragraph; its parts are strings, `Bold(...)` or `Muted(...)`;
- `Table`: columns and rows of values; numbers are formatted and right-aligned by the report;
- `Facts`: a row of (name, value) cards;
- `Items`: a list with a heading, each item a text and an optional muted note;
- `Chart`: series drawn as lines, histograms or horizontal bars (matplotlib, inlined as a PNG).

Every string is escaped by the report, so a stage can pass model output as it is. `read_rows`,
`read_json`, `short` and `wall_time` are the small readers and formatters the report uses itself.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def read_json(path: Path) -> Any:
    """A JSON file's value, or None when it is missing or unreadable (a stage still running)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_rows(path: Path) -> list[dict]:
    """A rows.jsonl's rows, skipping a half-written line of a stage still running (the file is not touched)."""
    path = Path(path)
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict)]


def short(text: Any, n: int = 60) -> str:
    """`text` on one line, cut to `n` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def wall_time(s: Any) -> str:
    """Seconds as `12.3 s`, `4 min 05 s` or `1 h 02 min`; `—` when not a number."""
    if not is_number(s):
        return "—"
    s = float(s)
    return (
        f"{s:.1f} s"
        if s < 60
        else f"{int(s // 60)} min {int(s % 60):02d} s"
        if s < 3600
        else f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    )


@dataclass(frozen=True)
class Bold:
    value: Any


@dataclass(frozen=True)
class Muted:
    value: Any


@dataclass(frozen=True)
class Code:
    value: Any


@dataclass
class Heading:
    text: str


@dataclass
class Text:
    parts: list[Any]  # str | Bold | Muted | Code | a number
    muted: bool = False  # the whole paragraph in the muted style


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]  # cells: str, number, None ("—"), Bold, Muted, Code, or a list of those
    numeric: list[str] | None = None  # columns drawn right-aligned (default: those whose every value is a number)
    style: Literal["", "metrics", "metrics compact", "samples"] = ""  # samples: long texts, each in a scrolling box
    first_width: str | None = None  # e.g. "22%": the first column's width


@dataclass
class Facts:
    items: list[tuple[str, Any]]  # (name, value); None values are left out


@dataclass
class Items:
    heading: str
    items: list[Any]  # str, or (text, muted note)


@dataclass
class Series:
    name: str
    x: list[Any]  # line: x values; barh: the bar labels; histogram: unused
    y: list[float]  # line: y values; barh: the bar lengths; histogram: the sample
    color: int | None = None  # index into the report's palette (default: the series' position)
    dashed: bool = False


@dataclass
class Chart:
    kind: Literal["line", "histogram", "barh"]
    series: list[Series]
    alt: str  # the image's text alternative
    xlabel: str = ""
    ylabel: str = ""
    title: str = ""
    log_x: bool = False
    xticks: list[Any] | None = None  # line: the ticks to label (with thousands separators)
    hline: tuple[float, str] | None = None  # line: a dotted reference line (y, label), e.g. chance
    mean_lines: bool = False  # histogram: a dashed line at each series' mean
    size: tuple[float, float] = (6.4, 4.0)
    grid: bool = True


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Any] = field(default_factory=list)  # Heading | Text | Table | Facts | Items | Chart
