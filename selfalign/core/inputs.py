"""One way to read a file a user handed us (recipe, prompts, data, assets, model and adapter configs).

Every reader here turns the ways such a file can be wrong (missing, unreadable, not UTF-8, broken
YAML or JSON, nested too deep) into a `SelfAlignError` of one line that names the file, where in it
the problem is when that is known, and what to do. A user then sees `error: x.txt: line 2: not
UTF-8 text` instead of a traceback, and the CLI exits 2 before anything is written.

Names also live here: `check_name` is the one rule for anything a recipe turns into a folder or a
file name (stage names, `builtin:` references), so that no recipe can point selfalign outside the
run folder or the assets (issue #14, "names are names").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from selfalign.core.errors import SelfAlignError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_name(name: str, what: str) -> str:
    """`name` if it is a plain name (letters, digits, `_ . -`, no `..`), else a SelfAlignError. Checked
    before any path is built from it, so `a/../../x` can never become a folder outside the run."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise SelfAlignError(f"{what} {name!r} is not a plain name",
                             "use letters, digits, '_', '.' and '-' only (no '/' and no '..')")
    return name


def inside(root: Path, path: Path, what: str) -> Path:
    """`path` if it resolves inside `root`, else a SelfAlignError (a `builtin:` reference that climbs
    out of the package's assets)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise SelfAlignError(f"{what}: points outside {root}", "builtin: names a file among the shipped assets")
    return resolved


def _where_hint(what: str) -> str:
    return f"fix the {what}, or pass another one"


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SelfAlignError(f"{what} {path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise SelfAlignError(f"{what} {path} is a folder, not a file", "pass the file itself") from None
    except PermissionError:
        raise SelfAlignError(f"{what} {path}: permission denied", "make it readable (chmod) or copy it") from None
    except OSError as exc:
        raise SelfAlignError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path`. A bad byte is reported with its line and column."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SelfAlignError(f"{path}: line {line}, column {col}: not UTF-8 text (byte 0x{data[exc.start]:02x})",
                             "save the file as UTF-8") from None


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """The parsed YAML of `path` (None for an empty file); errors give line and column."""
    import yaml

    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SelfAlignError(f"{path}:{where} invalid YAML: {problem}", _where_hint(what)) from None
    except RecursionError:
        raise SelfAlignError(f"{path}: the YAML is nested too deeply to read", _where_hint(what)) from None


def parse_json(text: str, source: str, what: str = "JSON") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SelfAlignError(f"{source}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})",
                             _where_hint(what)) from None
    except RecursionError:
        raise SelfAlignError(f"{source}: the JSON is nested too deeply to read", _where_hint(what)) from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    return parse_json(read_text(path, what), str(path), what)


def read_json_object(path: str | Path, what: str = "JSON file") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise SelfAlignError(f"{path}: expected a JSON object ({{...}}), got {type(data).__name__}", _where_hint(what))
    return data


def parse_json_line(line: str, path: str | Path, lineno: int) -> Any:
    """One line of a JSONL file; errors name the file and the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise SelfAlignError(f"{path}:{lineno}: broken JSON line ({exc.msg})", "fix or remove that line") from None
    except RecursionError:
        raise SelfAlignError(f"{path}:{lineno}: the JSON is nested too deeply to read",
                             "fix or remove that line") from None


def read_jsonl(path: str | Path, what: str = "JSONL file") -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line."""
    return [(lineno, parse_json_line(line, path, lineno))
            # "\n" only: JSONL
            for lineno, line in enumerate(read_text(path, what).split("\n"), start=1) if line.strip()]
