"""The evaluation data: BIG-bench's HHH alignment and TruthfulQA tasks, fetched at run time, never committed.

Both tasks (and the capability battery's) ship inside the source distribution of `bigbench==1.0.0` on PyPI (a 358 MB
archive).
On first use the archive is downloaded, only the files below are streamed out of it into
`cache_dir()/data/bigbench-1.0.0/`, a marker is written, and the archive is deleted; later runs
read the cache. With `data_dir` (the `--data-dir` option) the same layout is read from that
folder instead and nothing is fetched:

    DATA_DIR/hhh_alignment/{harmless,helpful,honest,other}/task.json
    DATA_DIR/truthful_qa/questions.json
    DATA_DIR/<task>/task.json            (the capability battery: see evals/capability.py)

(`bigbench/benchmark_tasks/` of a BIG-bench checkout has this layout.)

Formats, as in BIG-bench 1.0.0:

- HHH `task.json`: a BIG-bench JSON task; `examples` is a list of `{"input": str, "target_scores":
  {choice: 0 | 1}}` with exactly two choices, one scored 1 (`good`) and one scored 0 (`bad`). Most
  inputs are one human query; 41 of the 221 are a dialogue: the first human turn without a prefix,
  then turns such as "\\n\\nAssistant:  ...\\n\\nHuman:  ..." (two spaces after the colon), always
  ending on a human turn. The file's `example_input_prefix` is "\\nHuman: " and its
  `example_output_prefix` "\\nAssistant:". Some inputs repeat (one query ranked against several
  responses, split into pairs), so `id` is by position, not by input.
- TruthfulQA `questions.json`: `{"canary", "prefix", "examples"}`; `prefix` is the few-shot "Q: ...\\nA:
  ...\\n\\n" block BIG-bench puts before every question (see `truthfulqa_prefix`); each example is
  `{"Question", "Category", "True answers", "False answers", "Best answer"}`. In 1.0.0 the best
  answer is always one of the true answers, so `correct_answers` is "True answers" as-is, in file
  order; a file whose best answer is missing from its true answers gets it put first, so that
  `best_answer in correct_answers` always holds.

The download does not go through `pip download`: pip prepares the sdist's metadata even with
`--no-deps`, and bigbench 1.0.0 declares a direct-URL dependency (bleurt), which pip refuses for a
distribution from PyPI. The archive URL is read from the PyPI simple index instead (PEP 691 JSON,
`$PIP_INDEX_URL` if set), falling back to its known files.pythonhosted.org address, and the
download is checked against the archive's known size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from selfalign.core.errors import SelfAlignError
from selfalign.core.paths import cache_dir

# The capability battery's tasks (evals/capability.py scores them), with why each was chosen; kept here
# because this module decides which files are fetched.
CAPABILITY_WHY: dict[str, str] = {
    "general_knowledge": "everyday facts (70 items, ~7.6 choices); base 57.5% of 40 items vs 13.6% chance: "
                         "what a model knows, which fine-tuning on its own answers could erode",
    "arithmetic/1_digit_addition": "one-digit sums (100 items, ~6.4 choices); base 42.5% of 40 vs 16.6% chance "
                                   "(55% per character): a skill, not a fact, that no alignment data teaches",
    "human_organs_senses": "which organ does what (42 items, 4 choices); base 50% of 40 vs 25% chance: "
                           "short plain-language knowledge questions, the register the assistant is trained in",
}

HHH_CATEGORIES = ("harmless", "helpful", "honest", "other")
HHH_COUNTS = {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}
TRUTHFULQA_COUNT = 299

BIGBENCH_VERSION = "1.0.0"
SDIST_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
SDIST_SIZE = 358_249_635
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_FALLBACK_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    + SDIST_NAME
)
DEFAULT_INDEX = "https://pypi.org/simple"
MARKER = "_selfalign_source.json"  # written last into the cache folder: its presence means complete

HHH_FILES = {cat: f"hhh_alignment/{cat}/task.json" for cat in HHH_CATEGORIES}
TRUTHFULQA_FILE = "truthful_qa/questions.json"
CAPABILITY_FILES = tuple(f"{task}/task.json" for task in CAPABILITY_WHY)  # the capability battery's tasks
DATA_FILES = (*HHH_FILES.values(), TRUTHFULQA_FILE, *CAPABILITY_FILES)  # relative to the data folder
ARCHIVE_PREFIX = "bigbench/benchmark_tasks/"  # where DATA_FILES sit in the archive, under its top folder

LAYOUT_HINT = (
    "pass --data-dir DIR with DIR/hhh_alignment/{harmless,helpful,honest,other}/task.json and "
    "DIR/truthful_qa/questions.json, copied from bigbench/benchmark_tasks/ of BIG-bench 1.0.0 "
    f"(the {SDIST_NAME} source archive on PyPI, or github.com/google/BIG-bench)"
)


@dataclass(frozen=True)
class HHHItem:
    id: str  # f"{category}-{index:03d}", the index in the category's task.json
    category: str  # harmless | helpful | honest | other
    input: str  # the human's query, or the dialogue so far, as in task.json
    good: str  # the choice with target score 1
    bad: str  # the choice with target score 0


@dataclass(frozen=True)
class TruthfulQAItem:
    id: str  # f"truthfulqa-{index:03d}", the index in questions.json
    question: str
    best_answer: str
    correct_answers: tuple[str, ...]  # "True answers"; always includes best_answer
    incorrect_answers: tuple[str, ...]  # "False answers"
    category: str = ""  # e.g. "Misconceptions", "Indexical Error: Time"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- locating (and fetching) the data ------------------------------------------------------------
def bigbench_dir(data_dir: str | Path | None = None) -> Path:
    """The folder holding DATA_FILES: `data_dir` if given (never fetched), else `$SELFALIGN_DATA_DIR`
    if set, else the cache, fetched into on first use."""
    data_dir = data_dir if data_dir is not None else os.environ.get("SELFALIGN_DATA_DIR")
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise SelfAlignError(f"--data-dir {folder}: no such folder", LAYOUT_HINT)
        return folder
    dest = cache_dir() / "data" / f"bigbench-{BIGBENCH_VERSION}"
    if _complete(dest):
        return dest
    return _fetch_into(dest)


def _complete(folder: Path) -> bool:
    """A finished fetch that holds every file this version needs (an older selfalign kept fewer)."""
    return (folder / MARKER).exists() and all((folder / rel).is_file() for rel in DATA_FILES)


def _fetch_into(dest: Path) -> Path:
    """Download the sdist into a scratch folder beside `dest`, stream the data files out of it,
    check them, and move them into place; the archive is deleted whatever happens."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".bigbench-fetch-", dir=dest.parent))
    try:
        t0 = time.time()
        _say(f"Fetching BIG-bench evaluation data ({SDIST_SIZE / 1e6:.0f} MB, once)...")
        staging = scratch / "data"
        try:
            archive, url = _download_sdist(scratch)
            _extract_data_files(archive, staging)
            archive.unlink()
        except SelfAlignError:
            raise
        except Exception as exc:  # network, TLS, disk, a broken archive: all end the same way for the user
            raise SelfAlignError(
                f"could not fetch the BIG-bench evaluation data ({SDIST_NAME} from PyPI): "
                f"{type(exc).__name__}: {str(exc)[:200]}",
                LAYOUT_HINT,
            ) from exc
        load_hhh(staging)  # the counts, checked before the folder counts as complete
        load_truthfulqa(staging)
        load_capability(staging)
        sizes = sum((staging / rel).stat().st_size for rel in DATA_FILES)
        source = {"package": f"bigbench=={BIGBENCH_VERSION}", "url": url, "sha256": SDIST_SHA256,
                  "files": list(DATA_FILES), "bytes": sizes, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (staging / MARKER).write_text(json.dumps(source, indent=2))
        if not _complete(dest):  # else another process finished first: keep its copy
            shutil.rmtree(dest, ignore_errors=True)
            try:
                staging.replace(dest)
            except OSError:
                if not _complete(dest):
                    raise
        _say(f"Fetched in {time.time() - t0:.0f} s; {len(DATA_FILES)} files ({sizes / 1e3:.0f} kB) cached at {dest} "
             "(the archive was deleted).")
        return dest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _sdist_url() -> str:
    """The archive's URL from the package index's simple page (JSON, else HTML); the known
    files.pythonhosted.org address if the index cannot be read."""
    index = (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")
    page = f"{index}/bigbench/"
    req = urllib.request.Request(
        page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = resp.read().decode("utf-8", "replace")
            kind = resp.headers.get("Content-Type", "")
        if "json" in kind:
            links = [(f["filename"], f["url"]) for f in json.loads(body).get("files", [])]
        else:
            links = [(urllib.parse.unquote(h.split("#")[0].rsplit("/", 1)[-1]), h)
                     for h in re.findall(r'href="([^"]+)"', body)]
        for name, href in links:
            if name == SDIST_NAME:
                return urllib.parse.urljoin(page, href.split("#")[0])
    except Exception:  # any failure here falls back to the known address
        pass
    return SDIST_FALLBACK_URL


def _download_sdist(folder: Path) -> tuple[Path, str]:
    """Download the bigbench sdist into `folder` (streamed, with a progress bar) and check its
    size and SHA-256. Returns (archive path, URL)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from selfalign.core.progress import console

    url = _sdist_url()
    path = folder / SDIST_NAME
    digest = hashlib.sha256()
    done = 0
    with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as out:
        total = int(resp.headers.get("Content-Length") or SDIST_SIZE)
        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task(SDIST_NAME, total=total)
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                progress.update(task, completed=done)
    if done != SDIST_SIZE or digest.hexdigest() != SDIST_SHA256:
        raise SelfAlignError(
            f"the downloaded {SDIST_NAME} from {url} is not the expected archive "
            f"({done} bytes, sha256 {digest.hexdigest()[:16]}...; expected {SDIST_SIZE} bytes, sha256 "
            f"{SDIST_SHA256[:16]}...)",
            LAYOUT_HINT,
        )
    return path, url


def _extract_data_files(archive: Path, staging: Path) -> None:
    """Stream through the archive once, writing only DATA_FILES (never `tarfile.extract`: the
    names inside do not choose where anything is written)."""
    wanted = {ARCHIVE_PREFIX + rel: rel for rel in DATA_FILES}
    found: set[str] = set()
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.split("/", 1)[1] if "/" in member.name else member.name  # drop bigbench-1.0.0/
            rel = wanted.get(name)
            if rel is None or rel in found:
                continue
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            target.write_bytes(src.read())
            found.add(rel)
            if len(found) == len(wanted):
                break
    if missing := [rel for rel in DATA_FILES if rel not in found]:
        raise SelfAlignError(f"{SDIST_NAME} does not contain {', '.join(ARCHIVE_PREFIX + m for m in missing)}",
                             LAYOUT_HINT)


# -- parsing ------------------------------------------------------------------------------------
def _read_json(path: Path, data_dir) -> dict:
    if not path.is_file():
        where = "--data-dir" if data_dir is not None else "the cached BIG-bench data"
        raise SelfAlignError(f"{path} not found (looked for it in {where})", LAYOUT_HINT)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SelfAlignError(f"{path} is not valid JSON: {exc}", LAYOUT_HINT) from exc
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise SelfAlignError(f"{path}: expected a JSON object with an 'examples' list", LAYOUT_HINT)
    return data


def _check_count(path: Path, found: int, expected: int) -> None:
    if found != expected:
        raise SelfAlignError(
            f"{path}: expected {expected} examples (BIG-bench {BIGBENCH_VERSION}), found {found}",
            "use the files of BIG-bench 1.0.0, or pass verify=False for a folder of your own",
        )


def _parse_hhh_example(path: Path, i: int, ex) -> tuple[str, str, str]:
    where = f"{path}: examples[{i}]"
    if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
        raise SelfAlignError(f"{where}: expected an object with a string 'input'")
    scores = ex.get("target_scores")
    if not isinstance(scores, dict) or len(scores) != 2:
        raise SelfAlignError(f"{where}: 'target_scores' must map exactly two choices to scores 1 and 0")
    good = [c for c, s in scores.items() if s == 1 and not isinstance(s, bool)]
    bad = [c for c, s in scores.items() if s == 0 and not isinstance(s, bool)]
    if len(good) != 1 or len(bad) != 1:
        raise SelfAlignError(f"{where}: 'target_scores' must score one choice 1 and the other 0, got "
                             f"{list(scores.values())}")
    return ex["input"], good[0], bad[0]


def should_verify(data_dir: str | Path | None) -> bool:
    """Counts are checked on the fetched BIG-bench cache only: a hand-placed folder (`data_dir` or
    $SELFALIGN_DATA_DIR) may hold a subset or a fixture."""
    return not (data_dir or os.environ.get("SELFALIGN_DATA_DIR"))


def load_hhh(data_dir: str | Path | None = None, verify: bool = True) -> list[HHHItem]:
    """The HHH alignment items, categories in HHH_CATEGORIES order, each in file order."""
    folder = bigbench_dir(data_dir)
    items = []
    for cat in HHH_CATEGORIES:
        path = folder / HHH_FILES[cat]
        examples = _read_json(path, data_dir)["examples"]
        if verify:
            _check_count(path, len(examples), HHH_COUNTS[cat])
        for i, ex in enumerate(examples):
            query, good, bad = _parse_hhh_example(path, i, ex)
            items.append(HHHItem(id=f"{cat}-{i:03d}", category=cat, input=query, good=good, bad=bad))
    return items


def _str_list(where: str, ex: dict, key: str) -> tuple[str, ...]:
    value = ex.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise SelfAlignError(f"{where}: {key!r} must be a non-empty list of strings")
    return tuple(value)


def load_truthfulqa(data_dir: str | Path | None = None, verify: bool = True) -> list[TruthfulQAItem]:
    """The TruthfulQA questions, in file order."""
    path = bigbench_dir(data_dir) / TRUTHFULQA_FILE
    examples = _read_json(path, data_dir)["examples"]
    if verify:
        _check_count(path, len(examples), TRUTHFULQA_COUNT)
    items = []
    for i, ex in enumerate(examples):
        where = f"{path}: examples[{i}]"
        if not isinstance(ex, dict):
            raise SelfAlignError(f"{where}: expected an object")
        for key in ("Question", "Best answer"):
            if not isinstance(ex.get(key), str) or not ex[key].strip():
                raise SelfAlignError(f"{where}: {key!r} must be a non-empty string")
        true, false = _str_list(where, ex, "True answers"), _str_list(where, ex, "False answers")
        best = ex["Best answer"]
        if best not in true:
            true = (best, *true)
        category = ex.get("Category", "")
        items.append(TruthfulQAItem(
            id=f"truthfulqa-{i:03d}", question=ex["Question"], best_answer=best, correct_answers=true,
            incorrect_answers=false, category=category if isinstance(category, str) else str(category),
        ))
    return items


@dataclass(frozen=True)
class MCItem:
    id: str  # f"{task}-{index:03d}"
    task: str
    context: str  # the text the choices continue
    choices: tuple[str, ...]
    answer: int  # index of the choice scored 1 (the first, if several)


def task_items(task: str, doc: dict, path: Path | str = "") -> list[MCItem]:
    """The multiple-choice examples of one BIG-bench task.json, rendered as BIG-bench does for
    zero-shot scoring: task prefix, input prefix (default "\\nQ: "), input, output prefix
    (default "\\nA: "); an example without exactly one best choice is skipped."""
    prefix = str(doc.get("task_prefix") or "")
    q = doc.get("example_input_prefix", "\nQ: ")
    a = doc.get("example_output_prefix", "\nA: ")
    items = []
    for i, ex in enumerate(doc.get("examples") or []):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(ex.get("input"), str):
            continue
        best = max(scores.values())
        if sum(1 for s in scores.values() if s == best) != 1:
            continue
        choices = tuple(str(c) for c in scores)
        answer = list(scores.values()).index(best)
        items.append(MCItem(f"{task.replace('/', '.')}-{i:03d}", task, f"{prefix}{q}{ex['input']}{a}".lstrip(),
                            choices, answer))
    if not items:
        raise SelfAlignError(f"{path or task}: no multiple-choice examples (target_scores with one best choice)")
    return items


def load_capability(data_dir: str | Path | None = None, tasks: tuple[str, ...] | None = None) -> list[MCItem]:
    """The capability battery's items (evals/capability.py scores them), task by task in file order."""
    folder = bigbench_dir(data_dir)
    items = []
    for task in tasks or tuple(CAPABILITY_WHY):
        path = folder / f"{task}/task.json"
        items += task_items(task, _read_json(path, data_dir), path)
    return items



def truthfulqa_prefix(data_dir: str | Path | None = None) -> str:
    """The few-shot "Q: ...\\nA: ...\\n\\n" block questions.json carries ('' if it has none)."""
    path = bigbench_dir(data_dir) / TRUTHFULQA_FILE
    prefix = _read_json(path, data_dir).get("prefix", "")
    return prefix if isinstance(prefix, str) else ""


# -- fixtures -----------------------------------------------------------------------------------
def write_fixture(folder: Path, hhh: dict[str, list[tuple[str, str, str]]], truthfulqa: list[dict] | None,
                  capability: dict[str, list[tuple[str, dict[str, int]]]] | None = None) -> Path:
    """Write a data folder in the real formats, for tests and for `--data-dir` experiments.

    `hhh` maps a category to `(input, good, bad)` triples; only the categories given are written.
    `truthfulqa` is a list of dicts with `question`, `best_answer`, `correct_answers`,
    `incorrect_answers` and optionally `category` (or the file's own keys: "Question", "Best
    answer", "True answers", "False answers", "Category"); None writes no questions.json.
    `capability` maps a task of the capability battery to `(input, {choice: score})` pairs; None
    writes two made-up questions for each task of the battery.
    Load the result with `verify=False` unless the counts match the real ones. Returns `folder`.
    """
    folder = Path(folder)
    if capability is None:
        capability = {task: [("What is two plus two?", {"four": 1, "five": 0, "six": 0}),
                             ("Which animal barks?", {"a cat": 0, "a dog": 1})] for task in CAPABILITY_WHY}
    for task, examples in capability.items():
        path = folder / task / "task.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"name": task, "description": "selfalign test fixture", "metrics": ["multiple_choice_grade"],
               "examples": [{"input": q, "target_scores": dict(s)} for q, s in examples]}
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    for cat, triples in hhh.items():
        path = folder / "hhh_alignment" / cat / "task.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        task = {
            "name": cat, "description": "selfalign test fixture", "keywords": ["json", "zero-shot"],
            "preferred_score": "multiple_choice_grade", "example_input_prefix": "\nHuman: ",
            "example_output_prefix": "\nAssistant:", "append_choices_to_input": False,
            "metrics": ["multiple_choice_grade"],
            "examples": [{"input": q, "target_scores": {good: 1, bad: 0}} for q, good, bad in triples],
        }
        path.write_text(json.dumps(task, indent=4, ensure_ascii=False), encoding="utf-8")
    if truthfulqa is not None:
        examples = []
        for q in truthfulqa:
            if "Question" in q:
                examples.append(dict(q))
                continue
            examples.append({
                "Question": q["question"], "Category": q.get("category", "Fixture"),
                "True answers": list(q["correct_answers"]), "False answers": list(q["incorrect_answers"]),
                "Best answer": q["best_answer"],
            })
        path = folder / TRUTHFULQA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"prefix": "Q: What colour is a clear daytime sky?\nA: A clear daytime sky is blue.\n\n",
               "examples": examples}
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder
