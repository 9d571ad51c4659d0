import errno
import json

import pytest

from selfalign.core.errors import SelfAlignError
from selfalign.core.store import RowStore, read_jsonl, row_id


def test_row_id_is_stable_and_input_sensitive():
    assert row_id("a", 1, {"x": [1, 2]}) == row_id("a", 1, {"x": [1, 2]})
    assert row_id("a", 1) != row_id("a", 2)
    assert len(row_id("a")) == 16


def test_append_skips_known_ids_and_survives_reopen(tmp_path):
    store = RowStore(tmp_path / "s")
    assert store.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}]) == 2
    assert store.append([{"id": "a", "v": 99}, {"id": "c", "v": 3}]) == 1
    again = RowStore(tmp_path / "s")
    assert [r["id"] for r in again] == ["a", "b", "c"]
    assert again.rows()[0]["v"] == 1
    assert "c" in again and "z" not in again


def test_truncated_last_line_is_set_aside_and_reported(tmp_path):
    store = RowStore(tmp_path)
    store.append([{"id": "a"}, {"id": "b"}])
    with open(store.path, "a") as f:
        f.write('{"id": "c", "text": "half a ro')
    again = RowStore(tmp_path)
    assert [r["id"] for r in again] == ["a", "b"]
    assert again.repaired_tail.startswith('{"id": "c"')
    assert store.path.read_text().endswith("\n")
    assert "half a ro" in (tmp_path / "rows.jsonl.truncated-tail").read_text()
    again.append([{"id": "c"}])
    assert [r["id"] for r in read_jsonl(store.path)] == ["a", "b", "c"]


def test_broken_line_in_the_middle_names_file_and_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": "a"}\n{not json}\n{"id": "b"}\n')
    with pytest.raises(SelfAlignError, match=r"rows.jsonl:2: broken row"):
        RowStore(tmp_path)


def test_disk_full_keeps_rows_already_written(tmp_path, monkeypatch):
    store = RowStore(tmp_path)
    store.append([{"id": "a"}])
    real_open = open

    def full_disk(path, mode="r", *a, **k):
        if "a" in mode and str(path) == str(store.path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(SelfAlignError, match="No space left") as info:
        store.append([{"id": "b"}])
    assert "free some disk space" in str(info.value)
    monkeypatch.undo()
    assert "b" not in store  # not marked as written, so a rerun will write it
    assert [r["id"] for r in RowStore(tmp_path)] == ["a"]


def test_run_folder_blocked_by_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SelfAlignError, match="cannot create the run folder"):
        RowStore(tmp_path / "file" / "stage")


def test_done_marker_and_dataset(tmp_path):
    store = RowStore(tmp_path)
    store.append([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}])
    assert not store.is_done()
    info = store.mark_done(kept=2)
    assert store.is_done() and info["rows"] == 2
    assert json.loads((tmp_path / "_done.json").read_text())["kept"] == 2
    ds = store.to_dataset()
    assert ds.num_rows == 2 and ds["text"] == ["x", "y"]


def test_row_without_id_is_refused(tmp_path):
    with pytest.raises(ValueError):
        RowStore(tmp_path).append([{"text": "no id"}])


def test_rows_with_unicode_line_separators_survive_a_round_trip(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+0085 and U+001C as they are; a JSONL reader
    that splits on them (str.splitlines) breaks the row in two. Random-byte models write them."""
    from selfalign.core.inputs import read_jsonl as read_user_jsonl
    from selfalign.core.store import RowStore, read_jsonl

    text = "a\u2028b\x85c\x1cd\re"
    store = RowStore(tmp_path / "s")
    store.append([{"id": "x", "text": text}, {"id": "y", "text": "plain"}])
    assert [r["text"] for r in RowStore(tmp_path / "s")] == [text, "plain"]
    assert [r["text"] for r in read_jsonl(store.path)] == [text, "plain"]
    assert [v["text"] for _, v in read_user_jsonl(store.path)] == [text, "plain"]
