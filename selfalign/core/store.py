"""Append-only JSONL row store: the unit of "a run never loses work".

Each stage writes its rows into `<stage folder>/rows.jsonl`, one JSON object a line, each with
a stable `id` derived from its inputs. Rows are flushed and fsynced batch by batch, so a killed
process loses at most the batch in flight; on restart the stage asks `done_ids()` and skips
what is already there. A truncated last line (the process died mid-write) is cut off, kept in a
side file, and reported; a broken line anywhere else is an error naming the file and line,
because that is corruption, not an interrupted write.

Shards: a stage spread over workers (`workers: N`, `selfalign.core.distributed`) appends worker
K's rows to `rows.shard-K.jsonl` beside `rows.jsonl`. The store reads the main file and every
shard as one set of rows (an id is taken once, from the first file that has it), so resume,
exactly-once and the done-marker do not care how many workers wrote them; `merge_shards` folds
them into the main file once the stage's generation is complete, so readers of `rows.jsonl`
see everything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
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


def shard_path(folder: str | Path, filename: str, shard: int) -> Path:
    """Worker `shard`'s file beside `filename`: rows.jsonl -> rows.shard-3.jsonl."""
    stem, ext = _split_ext(filename)
    return Path(folder) / f"{stem}.shard-{shard}{ext}"


def shard_paths(folder: str | Path, filename: str = ROWS_FILE) -> list[Path]:
    """The shard files of `filename` in `folder`, by shard number."""
    stem, ext = _split_ext(filename)
    pattern = re.compile(re.escape(stem) + r"\.shard-(\d+)" + re.escape(ext))
    found = [(int(m.group(1)), p) for p in Path(folder).glob(f"{stem}.shard-*{ext}")
             if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _split_ext(filename: str) -> tuple[str, str]:
    stem, dot, ext = filename.rpartition(".")
    return (stem, f".{ext}") if dot and stem else (filename, "")


class RowStore:
    """Rows of one stage, in `folder/rows.jsonl` and its shards, with a done-marker `folder/_done.json`.

    `repair=False` reads without touching the files (a reader beside a writer: a half-written last
    line is skipped, not cut off)."""

    def __init__(self, folder: str | Path, filename: str = ROWS_FILE, repair: bool = True):
        self.folder = Path(folder)
        self.filename = filename
        self.path = self.folder / filename
        self.repaired_tail: str | None = None  # what was cut off a truncated last line, if anything
        self._repair = repair
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(self.folder, exc, "create the run folder") from exc
        self.reload()

    def reload(self) -> None:
        """(Re)read the main file and every shard (an id once, from the first file that has it)."""
        self._rows: list[dict] = []
        self._ids: set[str] = set()
        for path in [self.path, *shard_paths(self.folder, self.filename)]:
            for row in self._read_and_repair(path):
                if "id" in row and row["id"] in self._ids:
                    continue  # the same row in two files (a merge killed before it removed the shards)
                self._rows.append(row)
                if "id" in row:
                    self._ids.add(row["id"])

    # -- reading -------------------------------------------------------------------------------
    def _read_and_repair(self, path: Path) -> list[dict]:
        if not path.exists():
            return []
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _os_error(path, exc, "read") from exc
        if data and not data.endswith(b"\n") and not self._repair:
            data = data[: data.rfind(b"\n") + 1]
        elif data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            self.repaired_tail = self.repaired_tail or tail.decode("utf-8", errors="replace")
            side = path.with_name(path.name + ".truncated-tail")
            try:  # set the torn line aside first; the rows file is cut only once that copy is safe
                with open(side, "ab") as f:
                    f.write(tail + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                with open(path, "r+b") as f:
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
                    f"{path}:{lineno}: broken row ({exc.msg} at column {exc.colno})",
                    "fix or delete that line; the other rows are intact",
                ) from exc
            if not isinstance(row, dict):
                raise SelfAlignError(f"{path}:{lineno}: a row must be a JSON object, got {type(row).__name__}")
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
    def append(self, rows: Iterable[dict], shard: int | None = None) -> int:
        """Write rows (each needs an `id`), flush and fsync; into worker `shard`'s file when given.
        Rows whose id is already stored (in any file) are skipped."""
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
        path = self.path if shard is None else shard_path(self.folder, self.filename, shard)
        try:
            with open(path, "ab") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            for r in fresh:
                self._ids.discard(r["id"])
            raise _os_error(path, exc, "write rows to") from exc
        self._rows.extend(fresh)
        return len(fresh)

    def merge_shards(self) -> int:
        """Fold the shard files into the main file (every row once, written aside and swapped in),
        then delete them; returns how many shards there were. A kill between the two steps leaves
        rows in both, which the store reads once."""
        shards = shard_paths(self.folder, self.filename)
        if not shards:
            return 0
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rows).encode("utf-8")
        tmp = self.path.with_name(self.path.name + ".merging")
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
            for shard in shards:
                shard.unlink()
        except OSError as exc:
            raise _os_error(self.path, exc, "merge the workers' shards into") from exc
        return len(shards)

    # -- completion ----------------------------------------------------------------------------
    @property
    def done_path(self) -> Path:
        return self.folder / DONE_FILE

    def is_done(self) -> bool:
        return self.done_path.exists()

    def done_info(self) -> dict:
        return read_done(self.folder) or {}

    def mark_done(self, **info: Any) -> dict:
        from selfalign.core.ranks import is_follower

        payload = {"rows": len(self._rows), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        if not is_follower():  # in a launch, the main process's marker is the stage's
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
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: ranks of a launch may write at once
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
