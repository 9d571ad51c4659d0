"""Append-only JSONL row store: the unit of "a run never loses work".

Each stage writes its rows into `<stage folder>/rows.jsonl`, one JSON object a line, each with
a stable `id` derived from its inputs. Rows are flushed and fsynced batch by batch, so a killed
process loses at most the batch in flight; on restart the stage asks `done_ids()` and skips
what is already there. A truncated last line (the process died mid-write) is cut off, kept in a
side file, and reported; a broken line anywhere else is an error naming the file and line,
because that is corruption, not an interrupted write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from selfalign.core.errors import SelfAlignError

ROWS_FILE = "rows.jsonl"
DONE_FILE = "_done.json"


def row_id(*parts: Any) -> str:
    """A stable 16-hex-digit id for a row, from the JSON of the inputs that define it."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _os_error(path: Path, exc: OSError, doing: str) -> SelfAlignError:
    if exc.errno == errno.ENOSPC:
        hint = "free some disk space and run the same command again; rows already written are kept"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose a writable --out folder or fix its permissions; rows already written are kept"
    else:
        hint = "check the run folder; rows already written are kept"
    return SelfAlignError(f"cannot {doing} {path}: {exc.strerror or exc}", hint)


class RowStore:
    """Rows of one stage, in `folder/rows.jsonl`, with a done-marker `folder/_done.json`."""

    def __init__(self, folder: str | Path, filename: str = ROWS_FILE):
        self.folder = Path(folder)
        self.path = self.folder / filename
        self.repaired_tail: str | None = None  # what was cut off a truncated last line, if anything
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(self.folder, exc, "create the run folder") from exc
        self._rows: list[dict] = self._read_and_repair()
        self._ids = {r["id"] for r in self._rows if "id" in r}

    # -- reading -------------------------------------------------------------------------------
    def _read_and_repair(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise _os_error(self.path, exc, "read") from exc
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            self.repaired_tail = tail.decode("utf-8", errors="replace")
            side = self.path.with_name(self.path.name + ".truncated-tail")
            try:  # set the torn line aside first; the rows file is cut only once that copy is safe
                with open(side, "ab") as f:
                    f.write(tail + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
            except OSError as exc:
                raise _os_error(side, exc, "set the half-written last row aside in") from exc
            data = data[:cut]
        rows = []
        # JSONL lines end at "\n" only: str.splitlines() would also split inside a row at the U+2028, U+0085
        # and similar characters that json.dumps(ensure_ascii=False) writes as they are.
        for lineno, line in enumerate(data.decode("utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SelfAlignError(
                    f"{self.path}:{lineno}: broken row ({exc.msg} at column {exc.colno})",
                    "fix or delete that line; the other rows are intact",
                ) from exc
            if not isinstance(row, dict):
                raise SelfAlignError(f"{self.path}:{lineno}: a row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows

    def rows(self) -> list[dict]:
        return list(self._rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(list(self._rows))

    def __len__(self) -> int:
        return len(self._rows)

    def done_ids(self) -> set[str]:
        return set(self._ids)

    def __contains__(self, rid: str) -> bool:
        return rid in self._ids

    # -- writing -------------------------------------------------------------------------------
    def append(self, rows: Iterable[dict]) -> int:
        """Write rows (each needs an `id`), flush and fsync. Rows whose id is already stored are skipped."""
        fresh = []
        for row in rows:
            if "id" not in row:
                raise ValueError("every row needs an 'id'")
            if row["id"] in self._ids:
                continue
            self._ids.add(row["id"])
            fresh.append(row)
        if not fresh:
            return 0
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh).encode("utf-8")
        try:
            with open(self.path, "ab") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            for r in fresh:
                self._ids.discard(r["id"])
            raise _os_error(self.path, exc, "write rows to") from exc
        self._rows.extend(fresh)
        return len(fresh)

    # -- completion ----------------------------------------------------------------------------
    @property
    def done_path(self) -> Path:
        return self.folder / DONE_FILE

    def is_done(self) -> bool:
        return self.done_path.exists()

    def done_info(self) -> dict:
        return read_done(self.folder) or {}

    def mark_done(self, **info: Any) -> dict:
        payload = {"rows": len(self._rows), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        write_json_atomic(self.done_path, payload)
        return payload

    def to_dataset(self):
        """The rows as a `datasets.Dataset` (nested fields kept as they are)."""
        from datasets import Dataset

        return Dataset.from_list(self.rows())


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file written by anyone (no repair): errors name the file and the line."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):  # "\n" only, as above
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SelfAlignError(f"{path}:{lineno}: broken JSON line ({exc.msg})") from exc
    return rows


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON beside `path`, fsync it, then rename it into place: a kill or a full disk leaves
    the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload, indent=2, default=str))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise _os_error(path, exc, "write") from exc


def read_done(folder: str | Path) -> dict | None:
    """A stage folder's done-marker, or None when the stage has not finished. A marker that is not
    a JSON object is a one-line error (file, line, column): the stage cannot be trusted as finished."""
    from selfalign.core.inputs import read_json_object

    path = Path(folder) / DONE_FILE
    if not path.exists():
        return None
    try:
        return read_json_object(path, "done-marker")
    except SelfAlignError as exc:
        raise SelfAlignError(exc.message, "delete that file to redo the stage; its rows are kept and reused") from None


def replace_rows(folder: str | Path, rows: list[dict], filename: str = ROWS_FILE) -> RowStore:
    """Make `folder/filename` hold exactly `rows` (written aside, then swapped in: a kill leaves the
    old file or the new one). For derived rows, so that rows of an earlier run with other filter
    settings never linger beside the new ones."""
    path = Path(folder) / filename
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.exists() or path.read_text(encoding="utf-8") != blob:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    return RowStore(folder, filename)
