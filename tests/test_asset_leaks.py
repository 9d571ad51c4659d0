"""No evaluation item leaks into the text this project wrote (issue 12): every string of every
shipped asset (principles, exemplars, HHH dialogues, seeds, templates...) is checked against every
BIG-bench HHH query and reply and every TruthfulQA question and answer: no shared 8-word run, no
ROUGE-L above 0.5. Slow (about half a minute) and only where the BIG-bench data is already cached:
run it with `SELFALIGN_TEST_REAL_CACHE=1 pytest -m slow tests/test_asset_leaks.py`. The behaviour
eval's held-out prompts (assets/behaviour/) are evaluation text, not training text, so they are not
on the asset side here."""

from __future__ import annotations

import pytest

from selfalign.core.assets_io import ASSETS
from selfalign.evals.leaks import eval_items, find_leaks, text_segments

pytestmark = pytest.mark.slow


def asset_texts() -> list[tuple[str, str]]:
    out = []
    for path in sorted(ASSETS.rglob("*")):
        rel = path.relative_to(ASSETS)
        if path.suffix in (".yaml", ".yml", ".txt") and rel.parts[0] != "behaviour":
            out += [(f"{rel}:{where}", text) for where, text in text_segments(path)]
    return out


@pytest.fixture(scope="module")
def items():
    from selfalign.core.paths import cache_dir
    from selfalign.evals.data import BIGBENCH_VERSION, MARKER

    if not (cache_dir() / "data" / f"bigbench-{BIGBENCH_VERSION}" / MARKER).exists():
        pytest.skip("the BIG-bench data is not cached (set SELFALIGN_TEST_REAL_CACHE=1 once `selfalign eval "
                    "hhh` has fetched it)")
    return eval_items()


def test_no_asset_text_is_close_to_an_evaluation_item(items):
    texts = asset_texts()
    assert len(texts) > 300  # every asset was read
    leaks = find_leaks(texts, items)
    assert not leaks, "\n".join(f"{x.source}: {x.why} with {x.item}: {x.item_text[:80]!r}" for x in leaks)


def test_the_check_catches_a_reworded_item(items):
    """The checker itself can fail: a reworded BIG-bench question and a copied 8-word run are found."""
    item_id, text = next((i, t) for i, t in items if i.endswith(":question") and len(t.split()) >= 8)
    words = text.split()
    leaks = find_leaks([("copied", "Tell me: " + " ".join(words[:8]) + " please")], items)
    assert any(x.item == item_id for x in leaks)
