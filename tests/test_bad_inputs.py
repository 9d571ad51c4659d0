"""A catalogue of bad inputs and faults (issue #14): each must end in exit status 2 and one clear
line naming the problem, with no traceback, and leave every file that existed before byte for byte
as it was (a finished run sits in the working folder for that).

The CLI runs in-process (`selfalign.cli.main` with its own argv) so the table stays cheap; the
subprocess tests in test_cli.py cover the real entry point. A case is (id, setup, expected): setup
writes files into the working folder and returns the CLI arguments. `--out` points four folders deep
(`a/b/c/run`), so a name that climbs out of the run folder would land inside the working folder and
be caught as a new file outside the run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from selfalign.cli import main

RUN = "a/b/c/run"
TINY = ("--model", "tiny:llama")
PROMPTS = "First question?\nSecond question?\nThird question?\n"


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["selfalign", *args])
    monkeypatch.delenv("SELFALIGN_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main()
    out = capsys.readouterr()
    return stop.value.code, out.err + out.out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny `generate` run (3 prompts, 4 tokens each) killed after its last row and before its
    done-marker, copied into every case: the stage runs again, and its rows must survive."""
    base = tmp_path_factory.mktemp("finished")
    (base / "prompts.txt").write_text(PROMPTS)
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(base)
        mp.setattr(sys, "argv", ["selfalign", "generate", "--prompts", "prompts.txt", *TINY, "--out", RUN,
                                 "--max-new-tokens", "4"])
        with pytest.raises(SystemExit) as stop:
            main()
        assert stop.value.code == 0
    finally:
        mp.undo()
    assert (base / RUN / "01-generate" / "rows.jsonl").read_text().count("\n") == 3
    (base / RUN / "01-generate" / "_done.json").unlink()  # as if killed after its last row: the stage runs again
    return base


def write(path: str, data: str | bytes) -> str:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def recipe(body: str, name: str = "r.yaml") -> str:
    return write(name, body)


GEN = "  - stage: generate\n    prompts: prompts.txt\n    sampling: {max_new_tokens: 4}\n"


def gen(prompts_ref: str, *extra: str) -> list[str]:
    return ["generate", "--prompts", prompts_ref, *TINY, "--out", RUN, "--max-new-tokens", "4", *extra]


def adapter(folder: str, config: dict | str) -> str:
    write(f"{folder}/adapter_config.json", config if isinstance(config, str) else json.dumps(config))
    return folder


def _busy_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _busy_port.sockets.append(sock)  # held open until the module ends
    return sock.getsockname()[1]


_busy_port.sockets = []


def _fail_open(monkeypatch, suffix: str, err: int):
    """Make the row store's `open` fail for files ending in `suffix` (a full or read-only disk)."""
    import builtins

    import selfalign.core.store as store

    real = builtins.open

    def fake(file, mode="r", *a, **kw):
        if str(file).endswith(suffix) and any(c in mode for c in "aw+"):
            raise OSError(err, os.strerror(err), str(file))
        return real(file, mode, *a, **kw)

    monkeypatch.setattr(store, "open", fake, raising=False)


def torn_tail(rows: str) -> None:
    """The run was killed half-way through a row: a torn last line."""
    with open(rows, "ab") as f:
        f.write(b'{"id": "half-writ')


CASES = [
    # -- recipes ---------------------------------------------------------------------------------
    ("recipe-not-utf8", lambda mp: ["run", recipe(b"name: x\n# caf\xe9\n"), "--out", RUN],
     "r.yaml: line 2, column 6: not UTF-8"),
    ("recipe-bad-yaml", lambda mp: ["run", recipe("name: [x\nstages: 1\n"), "--out", RUN], "invalid YAML"),
    ("recipe-empty", lambda mp: ["run", recipe(""), "--out", RUN], "the recipe file is empty"),
    ("recipe-a-list", lambda mp: ["run", recipe("- 1\n- 2\n"), "--out", RUN], "a recipe must be a mapping"),
    ("recipe-no-stages", lambda mp: ["run", recipe("name: x\nstages: []\n"), "--out", RUN],
     "needs a non-empty list of stages"),
    ("recipe-unknown-stage", lambda mp: ["run", recipe("name: x\nstages:\n  - stage: magic\n"), "--out", RUN],
     "unknown stage 'magic'"),
    ("recipe-unknown-key", lambda mp: ["run", recipe("name: x\ncolour: red\nstages:\n" + GEN), "--out", RUN],
     "colour: unknown key"),
    ("recipe-typo-in-block",
     lambda mp: ["run", recipe("name: x\nstages:\n" + GEN.replace("max_new_tokens", "max_tokens")), "--out", RUN],
     "stages[0].sampling.max_tokens: unknown key"),
    ("recipe-wrong-type", lambda mp: ["run", recipe("name: x\nseed: many\nstages:\n" + GEN), "--out", RUN], "seed:"),
    ("recipe-duplicate-stage-names", lambda mp: ["run", recipe("name: x\nstages:\n" + GEN + GEN), "--out", RUN],
     "share the name 'generate'"),
    ("recipe-missing", lambda mp: ["run", "no-such-recipe", "--out", RUN], "recipe 'no-such-recipe' not found"),
    ("recipe-is-a-folder", lambda mp: ["run", str(Path("adir").mkdir() or "adir"), "--out", RUN], "is a folder"),
    ("recipe-nested-too-deep", lambda mp: ["run", recipe("x: " + "[" * 20000 + "]" * 20000 + "\n"), "--out", RUN],
     "r.yaml"),
    ("stage-name-escapes-run",
     lambda mp: ["run", recipe("name: x\nstages:\n" + GEN + "    name: a/../../../escape\n"), "--out", RUN],
     "stages[0].name: use letters, digits"),
    ("recipe-name-escapes-runs", lambda mp: ["run", recipe("name: ../../evil\nstages:\n" + GEN)],
     "name: use letters, digits"),
    ("unknown-stage-reference",
     lambda mp: ["run", recipe("name: x\nstages:\n" + GEN + "    model: '@nowhere'\n"), "--out", RUN],
     "nowhere"),
    ("empty-model-on-run", lambda mp: ["run", recipe("name: x\nstages:\n" + GEN), "--model", "", "--out", RUN],
     "model:"),
    # -- prompt files ----------------------------------------------------------------------------
    ("prompts-not-utf8", lambda mp: gen(write("bad.txt", b"ok\nbad \xff\n")),
     "bad.txt: line 2, column 5: not UTF-8 text"),
    ("prompts-missing", lambda mp: gen("nope.txt"), "prompt file nope.txt does not exist"),
    ("prompts-a-folder", lambda mp: gen(str(Path("pdir").mkdir() or "pdir")), "is a folder"),
    ("prompts-only-comments", lambda mp: gen(write("c.txt", "# nothing\n\n")), "holds no prompts"),
    ("prompts-broken-jsonl", lambda mp: gen(write("p.jsonl", '{"prompt": "ok"}\n{"prompt": "bro\n')),
     "p.jsonl:2: broken JSON line"),
    ("prompts-jsonl-no-field", lambda mp: gen(write("p.jsonl", '{"text": "x"}\n')),
     "needs a 'prompt' (text) or 'messages'"),
    ("prompts-jsonl-not-string", lambda mp: gen(write("p.jsonl", '{"prompt": 3}\n')),
     "prompt: must be a non-empty string"),
    ("prompts-jsonl-bad-messages",
     lambda mp: gen(write("p.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n')), "p.jsonl:1: messages:"),
    ("prompts-jsonl-nested-too-deep", lambda mp: gen(write("p.jsonl", "[" * 100000 + "\n")),
     "p.jsonl:1: the JSON is nested too deeply"),
    ("prompts-same-id-twice",
     lambda mp: gen(write("p.jsonl", '{"id": "a", "prompt": "x"}\n\n{"id": "a", "prompt": "y"}\n')),
     "p.jsonl:3: id 'a' is already used by a different prompt on line 1"),
    ("prompts-yaml-not-a-list", lambda mp: gen(write("p.yaml", "prompt: x\n")), "expected a non-empty list"),
    ("prompts-builtin-climbs", lambda mp: gen("builtin:../.."), "built-in prompt set '../..' is not a plain name"),
    ("prompts-builtin-file-climbs", lambda mp: gen("builtin:../../../../etc/hosts.yaml"), "points outside"),
    ("prompts-builtin-unknown", lambda mp: gen("builtin:nope"), "no built-in prompt set 'nope'"),
    ("prompt-longer-than-context", lambda mp: gen(write("long.txt", "x" * 1_000_000 + "\n")),
     "longer than the model's context of 2048"),
    # -- models ----------------------------------------------------------------------------------
    ("model-empty", lambda mp: ["generate", "--prompts", "prompts.txt", "--model", "", "--out", RUN], "model:"),
    ("model-missing-folder", lambda mp: ["generate", "--prompts", "prompts.txt", "--model", "./missing", "--out", RUN],
     "is not a folder, a .gguf file"),
    ("model-empty-folder",
     lambda mp: ["generate", "--prompts", "prompts.txt", "--model", str(Path("m").mkdir() or "m"), "--out", RUN],
     "holds no model"),
    ("model-not-a-gguf",
     lambda mp: ["generate", "--prompts", "prompts.txt", "--model", write("w.bin", "hello"), "--out", RUN],
     "is a file but not a .gguf model"),
    ("model-fake-gguf",
     lambda mp: ["generate", "--prompts", "prompts.txt", "--model", write("w.gguf", "not really"), "--out", RUN],
     "is not a GGUF file"),
    ("adapter-names-itself", lambda mp: ["generate", "--prompts", "prompts.txt", "--model",
                                         adapter("ad", {"base_model_name_or_path": str(Path("ad").resolve())}), "--out",
                                         RUN],
     "leads back to an adapter"),
    ("adapter-loop-of-two", lambda mp: ["generate", "--prompts", "prompts.txt", "--model",
                                        adapter("ad1", {"base_model_name_or_path": str(Path(adapter("ad2", {
                                            "base_model_name_or_path": str(Path("ad1").resolve())})).resolve())}),
                                        "--out", RUN],
     "leads back to an adapter"),
    ("adapter-config-broken",
     lambda mp: ["generate", "--prompts", "prompts.txt", "--model", adapter("ad", "{oops"), "--out", RUN],
     "adapter_config.json: line 1, column 2: invalid JSON"),
    ("adapter-config-not-utf8", lambda mp: ["generate", "--prompts", "prompts.txt", "--model", adapter("ad", "{}") and
                                            write("ad/adapter_config.json", b'{"x": "\xff"}') and "ad", "--out", RUN],
     "not UTF-8"),
    ("adapter-without-base",
     lambda mp: ["generate", "--prompts", "prompts.txt", "--model", adapter("ad", {"r": 8}), "--out", RUN],
     "names no base model"),
    # -- evaluation inputs -------------------------------------------------------------------------
    ("system-file-missing",
     lambda mp: ["generate", "--prompts", "prompts.txt", *TINY, "--system", "missing.txt", "--out", RUN],
     "system prompt file missing.txt does not exist"),
    ("system-builtin-unknown",
     lambda mp: ["generate", "--prompts", "prompts.txt", *TINY, "--system", "builtin:nope", "--out", RUN],
     "no built-in system prompt 'nope'"),
    # -- run folders -------------------------------------------------------------------------------
    ("out-is-a-file", lambda mp: gen("prompts.txt")[:-4] + ["--out", write("afile", "x")], "a file is in the way"),
    ("run-json-corrupt", lambda mp: write(f"{RUN}/run.json", "{not json") and gen("prompts.txt"), "run.json"),
    ("done-marker-corrupt-for-reference", lambda mp: write(f"{RUN}/01-generate/_done.json", "{half") and [
        "run", recipe("name: x\nstages:\n" + GEN + "  - stage: generate\n    name: again\n    prompts: prompts.txt\n"
                      "    model: '@generate'\n"), "--out", RUN], "_done.json: line 1"),
    ("rows-torn-tail-disk-full", lambda mp: (torn_tail(f"{RUN}/01-generate/rows.jsonl"),
                                             _fail_open(mp, ".truncated-tail", errno.ENOSPC)) and gen("prompts.txt"),
     "cannot set the half-written last row aside"),
    ("rows-torn-tail-read-only", lambda mp: (torn_tail(f"{RUN}/01-generate/rows.jsonl"),
                                             _fail_open(mp, ".truncated-tail", errno.EROFS)) and gen("prompts.txt"),
     "Read-only file system"),
    ("rows-disk-full-on-append", lambda mp: (write("more.txt", PROMPTS + "Fourth question?\n"),
                                             _fail_open(mp, "rows.jsonl", errno.ENOSPC)) and gen("more.txt"),
     "cannot write rows to a/b/c/run/01-generate/rows.jsonl: No space left on device"),
    # -- other commands ----------------------------------------------------------------------------
    ("serve-port-out-of-range", lambda mp: ["serve", "tiny:llama", "--port", "99999"],
     "--port 99999 is not a TCP port"),
    ("serve-port-taken", lambda mp: ["serve", "tiny:llama", "--port", str(_busy_port())], "cannot listen on 127.0.0.1"),
    ("stages-unknown", lambda mp: ["stages", "magic"], "no stage named 'magic'"),
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_catalogue_is_big_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_keeps_every_row(case, finished_run, tmp_path, monkeypatch, capsys):
    _, setup, expected = case
    work = tmp_path / "work"
    shutil.copytree(finished_run, work)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    args = setup(monkeypatch)
    before_args = snapshot(tmp_path)  # what setup wrote is part of "before"
    code, output = run_cli(args, monkeypatch, capsys)
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], output
    after = snapshot(tmp_path)
    for name, data in before_args.items():
        if Path(name).name in ("recipe.yaml", "recipe.previous.yaml"):
            continue  # the run keeps a copy of the recipe it was last asked to run
        if Path(name).name == "run.json" and name in after and data.startswith(b"{\n"):
            # the run record may note what was last asked (its inputs); what ran must stay as it was
            assert json.loads(after[name])["stages"] == json.loads(data)["stages"], f"{name}: stages changed"
            continue
        assert after.get(name) == data, f"{name} changed or vanished"
    new = [n for n in after if n not in before_args and not n.startswith(f"work/{RUN}/")]
    assert not new, f"files written outside the run folder: {new}"
    assert before.keys() <= after.keys()
