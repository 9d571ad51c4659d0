"""Preference-model pre-training (PMP) corpora: loaders, the StackExchange score rule, binarisation.

Askell et al. (2021) pre-train a preference model on large public preference-like data before
fine-tuning it on the small target set, and find that the *binarised* form transfers best. This
module turns such data into comparison rows `{"prompt", "chosen", "rejected"}`:

**StackExchange** (a question and its answers, each with a vote count and an accepted flag).
Every answer gets the score

    round(log2(1 + upvotes)), or −1 when upvotes < 0;  then +1 if the answer was accepted

(`stackexchange_score`; our reading of the paper's rule: the −1 stands in for the logarithm, which
is undefined for negative votes, and acceptance adds one on top of either). A question needs at
least two answers; every two of its answers with different scores make one pair, the higher score
chosen (pairs of identical texts are skipped). `max_pairs_per_question` keeps a seeded sample of a
question's pairs. The prompt is the question text.

Fields read, per line of a JSONL file (or row of a Parquet file, as in the Hugging Face
`stack-exchange-preferences` dataset):

    {"question": str, "title": str (optional, put on top of the question),
     "qid" | "question_id" | "id": (optional, kept for provenance),
     "answers": [{"text" | "body": str,
                  "pm_score": int            -- if present, taken as the score as it is, else
                  "upvotes" | "score": int,  -- the net vote count, and
                  "accepted" | "selected": bool (optional, default false)}]}

(the HF dataset stores the rule's result as `pm_score` and the accepted flag as `selected`; our
own fixtures store raw `score` votes and `accepted`).

**Comparison rows** (an ALMoST `compare` stage's `rows.jsonl`, or any JSONL/Parquet with `prompt`,
`chosen`, `rejected`): used as they are; rows marked `kept: false` (dropped by a filter) are skipped.

**Binarisation** (`binarise_pair`): a ranked pair A > B becomes two comparisons of one reply with
itself, tagged: "A tagged good" > "A tagged bad", and "B tagged bad" > "B tagged good". The tag is
appended to the reply text on a line of its own, `GOOD_TAG` / `BAD_TAG` below ("[good]" / "[bad]"),
after a blank line; at the end of the text it survives the left truncation every reward-model text
gets, and it is the last thing the scalar head reads before EOS.

Simplifications: StackExchange text is used as stored (HTML is not stripped); `max_pairs` keeps
the first pairs in file order, so a capped corpus comes from its first questions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import parse_json, parse_json_line, read_text
from selfalign.core.pairs import pair_problem

GOOD_TAG = "[good]"
BAD_TAG = "[bad]"
FORMATS = ("auto", "stackexchange", "pairs")
LAYOUT_HINT = ("StackExchange rows: {question, answers: [{text, score | pm_score, accepted | selected}]}; "
               "comparison rows: {prompt, chosen, rejected}")


# -- the score rule and binarisation (pure, unit-tested) ---------------------------------------------------
def stackexchange_score(upvotes: int, accepted: bool = False) -> int:
    """round(log2(1 + upvotes)), −1 for negative votes; +1 if accepted."""
    base = -1 if upvotes < 0 else round(math.log2(1 + upvotes))
    return base + (1 if accepted else 0)


def tag_reply(reply: str, good: bool) -> str:
    """The reply as binarised PMP shows it: the text, a blank line, then [good] or [bad]."""
    return f"{str(reply).strip()}\n\n{GOOD_TAG if good else BAD_TAG}"


def binarise_pair(pair: dict) -> list[dict]:
    """A > B becomes [good-A > bad-A, bad-B > good-B]; other keys of the pair are kept on both."""
    extra = {k: v for k, v in pair.items() if k not in ("chosen", "rejected", "id")}
    a, b = pair["chosen"], pair["rejected"]
    return [
        {**extra, "chosen": tag_reply(a, True), "rejected": tag_reply(a, False), "binarised": "chosen"},
        {**extra, "chosen": tag_reply(b, False), "rejected": tag_reply(b, True), "binarised": "rejected"},
    ]


def binarise(pairs: list[dict]) -> list[dict]:
    return [b for p in pairs for b in binarise_pair(p)]


def answer_score(answer: dict, where: str) -> int:
    """An answer's score: its `pm_score` as stored, else the rule on `upvotes`/`score` and `accepted`/`selected`."""
    if answer.get("pm_score") is not None:
        value = answer["pm_score"]
    else:
        votes = answer.get("upvotes", answer.get("score"))
        if votes is None:
            raise SelfAlignError(f"{where}: an answer has no vote count (upvotes, score or pm_score)", LAYOUT_HINT)
        try:
            votes = int(votes)
        except (TypeError, ValueError) as exc:
            raise SelfAlignError(f"{where}: vote count {votes!r} is not a number", LAYOUT_HINT) from exc
        return stackexchange_score(votes, bool(answer.get("accepted", answer.get("selected", False))))
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise SelfAlignError(f"{where}: pm_score {value!r} is not a number", LAYOUT_HINT) from exc


def question_pairs(record: dict, where: str, max_pairs: int | None = None, seed: int = 0) -> list[dict]:
    """Comparison pairs of one StackExchange question: every two answers with different scores."""
    answers = record.get("answers")
    if not isinstance(answers, list):
        raise SelfAlignError(f"{where}: 'answers' must be a list", LAYOUT_HINT)
    question = str(record.get("question") or "").strip()
    if not question:
        raise SelfAlignError(f"{where}: no 'question' text", LAYOUT_HINT)
    if title := str(record.get("title") or "").strip():
        question = f"{title}\n\n{question}"
    scored = []
    for k, ans in enumerate(answers):
        if not isinstance(ans, dict):
            raise SelfAlignError(f"{where}: answers[{k}] must be an object", LAYOUT_HINT)
        text = str(ans.get("text", ans.get("body")) or "").strip()
        if text:
            scored.append((answer_score(ans, f"{where}: answers[{k}]"), text))
    if len(scored) < 2:
        return []
    qid = next((record[k] for k in ("qid", "question_id", "id") if record.get(k) is not None), None)
    pairs = []
    for (sa, ta), (sb, tb) in combinations(scored, 2):
        if sa == sb or ta == tb:
            continue
        (hi_s, hi_t), (lo_s, lo_t) = ((sa, ta), (sb, tb)) if sa > sb else ((sb, tb), (sa, ta))
        pairs.append({"prompt": question, "chosen": hi_t, "rejected": lo_t, "chosen_score": hi_s,
                      "rejected_score": lo_s, **({"question_id": qid} if qid is not None else {})})
    if max_pairs is not None and len(pairs) > max_pairs:
        rng = random.Random(f"{seed}|{qid}|{question[:200]}")
        keep = sorted(rng.sample(range(len(pairs)), max_pairs))
        pairs = [pairs[i] for i in keep]
    return pairs


# -- reading files -------------------------------------------------------------------------------------
def corpus_files(path: Path) -> list[Path]:
    """The data files of a corpus: the file itself, or a folder's .jsonl/.json/.parquet files (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / "rows.jsonl").is_file():  # a stage folder
            return [path / "rows.jsonl"]
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and p.suffix.lower() in (".jsonl", ".json", ".parquet"))
        if files:
            return files
    raise SelfAlignError(f"corpus {path}: no such file, or a folder without .jsonl/.json/.parquet files", LAYOUT_HINT)


def iter_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a JSONL, JSON (a list) or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", rec
        return
    text = read_text(path, "data file")
    if suffix == ".json" and text.lstrip().startswith("["):
        data = parse_json(text, str(path), "data file")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise SelfAlignError(f"{path}: item {i} must be an object", LAYOUT_HINT)
            yield f"{path}: item {i}", rec
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rec = parse_json_line(line, path, lineno)
        if not isinstance(rec, dict):
            raise SelfAlignError(f"{path}:{lineno}: a row must be a JSON object", LAYOUT_HINT)
        yield f"{path}:{lineno}", rec


def detect_format(record: dict, where: str) -> str:
    if "answers" in record:
        return "stackexchange"
    if "chosen" in record and "rejected" in record:
        return "pairs"
    raise SelfAlignError(f"{where}: neither a StackExchange question (answers) nor a comparison (chosen, rejected)",
                         LAYOUT_HINT)


def load_corpus(path: str | Path, fmt: str = "auto", max_pairs: int | None = None,
                max_pairs_per_question: int | None = None, seed: int = 0) -> tuple[list[dict], dict]:
    """Comparison pairs of a StackExchange dump or of comparison rows, and counts of what was read.

    Counts: `format`, `records`, and for StackExchange `questions_too_few_answers` (under two
    answers), `questions_without_pairs` (all answers scored alike); for rows `not_kept`.
    """
    if fmt not in FORMATS:
        raise SelfAlignError(f"unknown corpus format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    pairs: list[dict] = []
    stats = {"format": fmt, "records": 0, "questions_too_few_answers": 0, "questions_without_pairs": 0, "not_kept": 0}
    for file in corpus_files(Path(path).expanduser()):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        for where, rec in iter_records(file):
            if max_pairs is not None and len(pairs) >= max_pairs:
                break
            if stats["format"] == "auto":
                stats["format"] = detect_format(rec, where)
            stats["records"] += 1
            if stats["format"] == "stackexchange":
                n_answers = len(rec.get("answers") or [])
                found = question_pairs(rec, where, max_pairs_per_question, seed)
                if n_answers < 2:
                    stats["questions_too_few_answers"] += 1
                elif not found:
                    stats["questions_without_pairs"] += 1
                pairs.extend(found)
            else:
                if problem := pair_problem(rec):
                    raise SelfAlignError(f"{where}: {problem}", LAYOUT_HINT)
                if rec.get("kept", True) is False:
                    stats["not_kept"] += 1
                    continue
                pairs.append({k: rec[k] for k in ("prompt", "chosen", "rejected")})
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    stats = {k: v for k, v in stats.items() if v or k in ("format", "records")}
    return pairs, stats


def source_path(ctx, ref: str) -> Path:
    """An earlier stage's rows (`compare` or `@compare`) or a file/folder, for the PM stages' data fields."""
    name = ref[1:] if ref.startswith("@") else ref
    if name in ctx.stage_dirs:
        return ctx.rows_file(name)
    path = Path(ref).expanduser()
    if path.exists():
        return path
    earlier = ", ".join(ctx.stage_dirs) or "none"
    raise SelfAlignError(f"{ref!r} is neither an earlier stage (earlier: {earlier}) nor a file or folder", LAYOUT_HINT)
