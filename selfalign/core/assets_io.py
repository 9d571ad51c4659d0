"""Reading the project's human-written inputs (principles, exemplars, red-team types, seed
tasks...): YAML lists under `selfalign/assets/`, or a user's file in the same shape."""

from __future__ import annotations

from pathlib import Path

from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import inside, read_text, read_yaml

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def asset_path(ref: str) -> Path:
    """`builtin:self_align/principles.yaml` (shipped) or a path of the user's."""
    if ref.startswith("builtin:"):
        path = inside(ASSETS, ASSETS / ref.split(":", 1)[1], ref)
    else:
        path = Path(ref).expanduser()
    if not path.is_file():
        raise SelfAlignError(f"{ref}: no such file", "use builtin:self_align/NAME.yaml or a path to your own YAML")
    return path


def read_yaml_list(path: Path, what: str = "entries") -> list:
    """The non-empty YAML list in `path`; errors name the file."""
    data = read_yaml(path, f"{what} file")
    if not isinstance(data, list) or not data:
        raise SelfAlignError(f"{path}: expected a non-empty list of {what}")
    return data


def load_yaml_list(ref: str, required: tuple[str, ...]) -> list[dict]:
    """A YAML list of mappings, each with the `required` keys; errors name the file and entry."""
    path = asset_path(ref)
    data = read_yaml_list(path)
    for i, entry in enumerate(data):
        missing = [k for k in required if not isinstance(entry, dict) or not str(entry.get(k, "")).strip()]
        if missing:
            raise SelfAlignError(f"{path}: entry {i}: missing {', '.join(missing)} (each entry needs "
                                 f"{', '.join(required)})")
    return data


def asset_text(ref: str) -> str:
    """The file's text without comment lines: what the report counts as human-written."""
    lines = read_text(asset_path(ref)).splitlines()
    return "\n".join(x for x in lines if x.strip() and not x.lstrip().startswith("#"))


def yaml_key(ref: str, key: str) -> str:
    """One text entry of a YAML mapping asset (e.g. the `engraved` system prompt)."""
    path = asset_path(ref)
    data = read_yaml(path)
    if not isinstance(data, dict) or not str(data.get(key) or "").strip():
        raise SelfAlignError(f"{path}: needs a non-empty `{key}` entry")
    return str(data[key]).strip()


def load_yaml_mapping(ref: str, required: tuple[str, ...] = ()) -> dict:
    """A YAML mapping asset (prompt templates, filter rules) with the `required` keys."""
    path = asset_path(ref)
    data = read_yaml(path)
    missing = [k for k in required if not isinstance(data, dict) or data.get(k) in (None, "")]
    if missing:
        raise SelfAlignError(f"{path}: needs {', '.join(missing)}")
    return data
