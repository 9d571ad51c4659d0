"""The run report: a hand-built run folder (no models) rendered to HTML, read as text and in a headless browser."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from selfalign.core.errors import SelfAlignError
from selfalign.stages import build_report

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
EVIL = '<script>alert("x")</script> & friends'
# what-ran (1) + one grouped bar chart per eval (4) + rewards (2) + training (1)
EXPECTED_CHARTS = 8


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))


def _results(model: str, system, shift: float) -> dict:
    cats = ("harmless", "helpful", "honest", "other", "overall")
    return {"model": model, "engine": "hf", "system": system, "evals": {
        "hhh": {"eval": "hhh",
                "metrics": {"likelihood": {c: round(0.5 + shift + i / 100, 4) for i, c in enumerate(cats)},
                            "ab": dict.fromkeys(cats, 0.5)},
                "counts": {"harmless": 58, "helpful": 59, "honest": 61, "other": 43, "overall": 221}, "wall_s": 130.2},
        "truthfulqa": {"eval": "truthfulqa", "metrics": {"truthfulqa": {"mc1": 0.25 + shift, "mc2": 0.41}},
                       "counts": {"questions": 299}, "wall_s": 80.0},
        "preference": {"eval": "preference",
                       "metrics": {"preference": {"accuracy": 0.61 + shift, "mean_margin": 0.3, "ties": 0}},
                       "counts": {"pairs": 200},
                       "rewards": {"chosen": [0.1, 0.5, 0.7, shift], "rejected": [-0.2, 0.3, -0.5]}},
        "winrate": {"eval": "winrate",
                    "metrics": {"winrate": {"win_rate": 0.6 + shift, "ci95_low": 0.5, "ci95_high": 0.7,
                                            "wins": 10, "ties": 4, "losses": 6}},
                    "counts": {"prompts": 20}},
    }}


def _gen_rows(stage: str, model: str, texts: list[str]) -> str:
    rows = [{"id": f"{stage}-{i}", "prompt_id": f"p{i}", "prompt": f"Question number {i}?", "messages": None,
             "sample": 0,
             "completion": t, "meta": {"stage": stage, "model": model}} for i, t in enumerate(texts)]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "demo"
    stages = {"base_answers": ("generate", 12.5), "eval_base": ("eval", 130.0), "sft": ("sft", 900.0),
              "aligned_answers": ("generate", 14.0), "eval_aligned": ("eval", 128.0)}
    _write(run / "run.json", {
        "name": "demo-run", "model": "embedded:gemma-3-270m", "engine": "hf", "seed": 7,
        "started_at": "2026-01-02T03:04:05",
        "inputs": [{"source": "builtin:quickstart", "lines": 16, "words": 182},
                   {"source": "principles.txt", "lines": 21, "words": 400}],
        "stages": {label: {"wall_s": wall, "stage": kind, "folder": f"{i:02d}-{label}", "summary": {"rows": 3}}
                   for i, (label, (kind, wall)) in enumerate(stages.items(), start=1)}})
    _write(run / "recipe.yaml", "name: demo-run\nmodel: embedded:gemma-3-270m\nstages: []\n")
    _write(run / "01-base_answers" / "rows.jsonl", _gen_rows("base_answers", "embedded:gemma-3-270m",
                                                             ["base one", "base two\nline 2", "base three"]))
    _write(run / "04-aligned_answers" / "rows.jsonl", _gen_rows("aligned_answers", "runs/demo/03-sft",
                                                                ["aligned one", EVIL, "aligned three " * 200]))
    _write(run / "02-eval_base" / "results.json", _results("embedded:gemma-3-270m", None, 0.0))
    _write(run / "05-eval_aligned" / "results.json", _results("runs/demo/03-sft", "You are a helpful AI.", 0.1)
           | {"system": "Consider the following conversation... " * 50, "system_name": "You are a helpful AI."})
    log = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4, "rewards/chosen": 0.1 * s, "kl": 0.01 * s}
           for s in range(1, 11)]
    _write(run / "03-sft" / "output" / "trainer_state.json",
           {"global_step": 10, "log_history": log + [{"step": 10, "train_loss": 0.5}]})
    _write(run / "03-sft" / "output" / "checkpoint-5" / "trainer_state.json", {"log_history": log[:5]})
    return run


def test_report_sections_numbers_and_escaping(run_dir):
    out = build_report(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text()
    for heading in ("What ran", "Human supervision", "Evaluations", "Reward distributions", "Training curves",
                    "Samples"):
        assert f"<h2>{heading}</h2>" in page
    assert "demo-run" in page and "embedded:gemma-3-270m" in page and "2026-01-02T03:04:05" in page
    assert "19 min 44 s" in page  # total wall time: 12.5 + 130 + 900 + 14 + 128 s
    assert '<td class="num">582</td><td class="num">37</td>' in page  # human input totals: words, then lines
    assert "Not counted: the recipe" in page
    assert "0.530" in page and "0.630" in page and "+0.100" in page  # hhh likelihood honest, before -> after
    evals = page[page.index("<h2>Evaluations</h2>"):]
    assert evals.index("eval_base") < evals.index("eval_aligned")  # columns in run order
    assert "n: harmless 58, helpful 59" in evals and "change" in evals
    assert "mc1" in page and "win_rate" in page and "system: You are a helpful AI." in page
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; friends" in page
    assert "base two\nline 2" in page and "aligned one" in page
    assert page.count('class="chart"') == EXPECTED_CHARTS
    assert "http://" not in page and "https://" not in page


def test_control_characters_are_made_visible(tmp_path):
    _write(tmp_path / "01-gen" / "rows.jsonl",
           _gen_rows("gen", "tiny:llama", ["a\x07b\x00c\x1b\x7f\x85"]) + '{"half": ')
    page = build_report(tmp_path, tmp_path / "sub" / "r.html").read_text()
    assert "a\u2407b\u2400c\u241b\u2421\ufffd" in page


def test_partial_run_renders(tmp_path):
    _write(tmp_path / "run.json", {"name": "partial", "stages": {"base_answers": {"wall_s": 3.0, "stage": "generate",
                                                                                  "folder": "01-base_answers"}}})
    (tmp_path / "01-base_answers").mkdir()  # no rows yet
    (tmp_path / "02-eval").mkdir()  # running: not in run.json, results half-written
    (tmp_path / "02-eval" / "results.json").write_text('{"evals": {"hhh"')
    page = build_report(tmp_path).read_text()
    assert "partial" in page and "What ran" in page and "unfinished" in page
    for absent in ("Evaluations", "Samples", "Training curves", "Human supervision"):
        assert absent not in page
    assert "<h1>" in build_report(tmp_path / "01-base_answers").read_text()  # not even a run folder: still a page


def test_missing_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SelfAlignError, match="no run folder"):
        build_report(tmp_path / "nope")


def test_report_in_headless_chromium(run_dir):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install playwright")
    out = build_report(run_dir)
    t0 = time.time()
    messages, errors = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.as_uri(), wait_until="load")
            charts = page.eval_on_selector_all("img.chart", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
            dialogs = page.evaluate("() => document.querySelectorAll('script').length")
            overflow = page.evaluate("() => Math.max(...[...document.querySelectorAll('.cell')].map(e => "
                                     "e.scrollHeight - e.clientHeight))")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    print(f"browser check: {time.time() - t0:.1f} s")
    assert not errors, errors
    assert not [m for m in messages if m[0] == "error"], messages
    assert len(charts) == EXPECTED_CHARTS
    assert all(done and width > 0 for done, width, _ in charts), charts
    assert dialogs == 0  # the <script> in a completion stayed text
    assert overflow > 0  # the long completion scrolls inside its cell instead of stretching the page
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_report_never_repairs_a_running_stage(run_dir):
    """A stage still writing (a half-written last row) is read as it is, not repaired the way RowStore would."""
    rows = run_dir / "01-base_answers" / "rows.jsonl"
    before = rows.read_bytes() + b'{"id": "cut'
    rows.write_bytes(before)
    assert "base three" in build_report(run_dir).read_text()
    assert rows.read_bytes() == before  # the report never changes a run
