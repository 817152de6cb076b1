"""Data sources read by Ray Data: round-trips, bad rows named (error and skip), split parts, built-in counts."""

from __future__ import annotations

import io
import json
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muki_ray.run.cli import main
from muki_ray.config.schema import Source
from muki_ray.data import sources
from muki_ray.data.sources import (
    BLOCK_ROWS,
    PY_WHITESPACE,
    CheckRows,
    DataError,
    check_labels,
    read_source,
    scan_source,
    stratified_order,
    to_ray_dataset,
)

ROWS = [{"id": f"r{i}", "text": f"text number {i}", "label": "ab"[i % 2]} for i in range(10)]
pytestmark = pytest.mark.usefixtures("ray_session")  # every source is read by Ray Data


def src(path, **kw):
    return Source(source=str(path), **kw)


def read(source, **kw) -> pa.Table:
    """A source's rows, collected (a test's small file only: the engine never does this)."""
    ds = read_source(source, **kw)
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))


def as_rows(table):
    return sorted(table.to_pylist(), key=lambda r: r["id"])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_roundtrip(tmp_path):
    t = read(src(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert as_rows(t) == sorted(ROWS, key=lambda r: r["id"])


def test_csv_roundtrip_with_column_mapping(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("doc,body,topic\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in ROWS))
    t = read(src(p, columns={"id": "doc", "text": "body", "label": "topic"}))
    assert as_rows(t) == sorted(ROWS, key=lambda r: r["id"])


def test_parquet_roundtrip_and_derived_ids(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}), p)
    t = read(src(p))
    assert sorted(t.column("id").to_pylist()) == sorted(f"d:{i}" for i in range(10))
    assert sorted(t.column("text").to_pylist()) == sorted(r["text"] for r in ROWS)


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert as_rows(read(src(tmp_path / "one"))) == sorted(ROWS, key=lambda r: r["id"])
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    assert read(src(tmp_path / "dict", split="test")).num_rows == 3
    with pytest.raises(DataError, match="split must be one of train, test"):
        read(src(tmp_path / "dict", split="nope"))


@pytest.mark.parametrize("content,expected", [
    (b'{"text": "ok"}\n{"text": ""}\n', "line 2: empty text"),
    (b'{"text": "ok"}\n{"text": "   "}\n', "line 2: empty text"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: text is not valid UTF-8"),
    (b'{"text": "ok"}\n{"text": "a"\n', "line 2: not valid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', "line 2: missing value in text column 'text'"),
    (b'{"body": "x"}\n', "missing text column 'text'"),
    (b'{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
    (b'{"text": "ok"}\n{"text": "a \\ud800 alone"}\n', "line 2: text is not valid Unicode"),
    (b"", "no rows"),
])
def test_jsonl_bad_rows_named(tmp_path, content, expected):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=expected) as e:
        scan_source(src(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_csv_bad_rows(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_bytes(b"text,label\nfine,a\n,b\ncaf\xe9,a\nok,b\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: empty text"):
        read(src(p))
    t = read(src(p), on_bad_row="skip")
    assert sorted(t.column("text").to_pylist()) == ["fine", "ok"]


def test_skip_mode_counts(tmp_path, caplog):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": ""}\n{"text": "\xff"}\n{"text": "b"}\n')
    t = read(src(p), on_bad_row="skip")
    assert t.num_rows == 2
    assert "skipped 2 bad rows" in caplog.text


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read(src(tmp_path / "nope.jsonl"))


def test_label_outside_union(tmp_path):
    info = scan_source(src(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert info.labels == {"a": 5, "b": 5}
    check_labels(info, ["a", "b"], "d.jsonl")
    with pytest.raises(DataError, match="d.jsonl: label 'b' is not in the union"):
        check_labels(info, ["a", "c"], "d.jsonl")


def test_a_bad_row_is_named_in_a_file_of_many_blocks(tmp_path):
    """The reader yields blocks of BLOCK_ROWS rows; a bad row in a later block keeps its line number."""
    n = 2 * BLOCK_ROWS + 100
    rows = [{"id": f"r{i}", "text": "" if i in (n - 50, n - 10) else f"text {i}"} for i in range(n)]
    p = write_jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(DataError, match=rf"many.jsonl: line {n - 49}: empty text"):
        scan_source(src(p))
    t = read(src(p), on_bad_row="skip")
    assert read_source(src(p), on_bad_row="skip").materialize().num_blocks() >= 3
    assert t.num_rows == n - 2 and f"r{n - 50}" not in t.column("id").to_pylist()


def test_file_parts_are_disjoint_deterministic_and_seeded(tmp_path):
    """A user's file is split by a seeded hash of the id: no row is held anywhere to split it."""
    rows = [{"id": f"r{i}", "text": "t", "label": "abc"[i % 3] if i < 2400 else "a"} for i in range(3000)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    first = read(src(p, part=(0.0, 0.5)))
    second = read(src(p, part=(0.5, 1.0)))
    a, b = set(first.column("id").to_pylist()), set(second.column("id").to_pylist())
    assert not a & b and len(a | b) == 3000
    # About half of every label in each part (a hash split, not an exact stratified one).
    for half in (first, second):
        c = Counter(half.column("label").to_pylist())
        assert abs(c["a"] - 700) < 80 and abs(c["b"] - 400) < 60 and abs(c["c"] - 400) < 60
    limited = read(src(p, part=(0.0, 0.5), limit=30))
    assert limited.num_rows == 30 and set(limited.column("id").to_pylist()) <= a
    assert scan_source(src(p, part=(0.0, 0.5), limit=30)).rows == 30
    again = read(src(p, part=(0.0, 0.5)), seed=0)
    other = read(src(p, part=(0.0, 0.5)), seed=1)
    assert set(again.column("id").to_pylist()) == a
    assert set(other.column("id").to_pylist()) != a


def test_builtin_parts_are_stratified():
    first = read(Source(source="bbc_news", split="train", part=(0.0, 0.5)))
    second = read(Source(source="bbc_news", split="train", part=(0.5, 1.0)))
    a, b = set(first.column("id").to_pylist()), set(second.column("id").to_pylist())
    assert not a & b and len(a | b) == 1558
    whole = Counter(first.column("label").to_pylist()) + Counter(second.column("label").to_pylist())
    for lab, n in Counter(first.column("label").to_pylist()).items():
        assert abs(n - whole[lab] / 2) <= 1
    limited = read(Source(source="bbc_news", split="train", part=(0.0, 0.5), limit=40))
    assert Counter(limited.column("label").to_pylist()) == {"business": 9, "entertainment": 7, "politics": 8,
                                                            "sports": 9, "tech": 7}


def test_stratified_order_unlabeled_is_a_permutation():
    order = stratified_order(None, 50, seed=3)
    assert sorted(order.tolist()) == list(range(50))
    assert not np.array_equal(order, np.arange(50))


def test_builtin_bbc_counts():
    splits = {s: read(Source(source="bbc_news", split=s)) for s in ("train", "dev", "test")}
    ids = [i for t in splits.values() for i in t.column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 2225
    labels = Counter(lab for t in splits.values() for lab in t.column("label").to_pylist())
    assert labels == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert splits["test"].num_rows == 444 and splits["dev"].num_rows == 223


def test_builtin_20newsgroups_counts():
    train = read(Source(source="20newsgroups", split="train"))
    dev = read(Source(source="20newsgroups", split="dev"))
    test = read(Source(source="20newsgroups", split="test"))
    assert train.num_rows + dev.num_rows == 11293 and test.num_rows == 7528
    assert not set(train.column("id").to_pylist()) & set(dev.column("id").to_pylist())
    assert len(set(test.column("label").to_pylist())) == 20


def test_builtin_bad_split():
    with pytest.raises(DataError, match="bbc_news: split must be one of train, dev, test"):
        read(Source(source="bbc_news"))


def test_datasets_command(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "bbc_news: 2225 docs in 5 classes" in out
    assert "test 7528; official train 11293" in out


def test_to_ray_dataset(tmp_path):
    t = read(src(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    ds = to_ray_dataset(t, 3)
    assert ds.num_blocks() == 4 and sorted(r["id"] for r in ds.take_all()) == sorted(r["id"] for r in ROWS)


# Lines that the column-wise path must leave to the row-wise one, or read exactly as it does.
EDGE_LINES = [
    b'{"id": 7, "text": "an int id", "label": "x"}\n',
    b'{"id": "b", "text": "an int label", "label": 3}\n',
    b'{"id": "c", "text": "\\u001c\\u2003 \\u0085", "label": "x"}\n',  # only str.isspace characters
    b'{"id": "d", "text": "  padded  ", "label": "x"}\n',
    b'\n',
    b'   \r\n',
    b'{"id": "e", "text": "crlf", "label": "x"}\r\n',
    b'{"id": "f", "text": "two", "label": "x"} {"id": "g", "text": "objects", "label": "x"}\n',
    b'{"id": "h",\n "text": "over two lines", "label": "x"}\n',
    b'{"id": "i", "text": "\\ud800 a lone surrogate", "label": "x"}\n',
    b'{"id": "j", "text": "duplicate", "text": "key", "label": "x"}\n',
    b'{"id": "k", "text": null, "label": "x"}\n',
    b'{"id": "l", "text": "no label"}\n',
    b'{"id": "m", "text": "caf\xe9", "label": "x"}\n',
    b'[1, 2]\n',
    b'{"id": "n", "text": NaN, "label": "x"}\n',
    b'{"id": "o", "text": 5, "label": "x"}\n',
    b'{"id": "p", "text": "\\ud83d\\ude00 \xf0\x9f\x98\x80", "label": "x", "extra": {"a": [1, null]}}\n',
    b'{"id": "q", "text": "a nul\\u0000 and", "label": true}\n',
    b'\xef\xbb\xbf{"id": "r", "text": "a BOM", "label": "x"}\n',
    b'{"id": "s", "text": "no newline at the end", "label": "x"}',
]


def checked_rows(content: bytes, fmt, row_wise: bool, monkeypatch) -> list[dict]:
    """CheckRows over the jsonl reader's blocks of CONTENT, column-wise where it can or row-wise only."""
    with monkeypatch.context() as m:
        if row_wise:
            m.setattr(sources, "_parse_clean_jsonl", lambda *a: None)
            m.setattr(CheckRows, "_clean", lambda self, raw: None)
        check = CheckRows(fmt, "text", "label", "id", seed=0)
        blocks = list(sources._jsonl_blocks(io.BytesIO(content), ("id", "text", "label"), "text"))
        return [r for b in blocks for r in check(b).to_pylist()]


@pytest.mark.parametrize("line", EDGE_LINES, ids=range(len(EDGE_LINES)))
def test_jsonl_read_column_wise_equals_row_wise(line, monkeypatch):
    """pyarrow parses clean chunks of lines; every other chunk goes line by line, so both paths
    give the same ids, texts, labels, line numbers and errors whatever a line holds."""
    good = b"".join(json.dumps({"id": f"g{i}", "text": f"good {i}", "label": "x"}).encode() + b"\n" for i in range(3))
    content = good + line + (good.replace(b'"g', b'"h') if line.endswith(b"\n") else b"")
    fmt = sources.FileFormat(kind="jsonl", files=("f.jsonl",), name="f.jsonl", stem="f", has_id=True, has_label=True)
    assert checked_rows(content, fmt, False, monkeypatch) == checked_rows(content, fmt, True, monkeypatch)


def test_a_clean_jsonl_chunk_is_parsed_column_wise():
    lines = [json.dumps({"id": f"g{i}", "text": f" good {i}", "label": "x", "n": i}).encode() + b"\n" for i in range(5)]
    t = sources._parse_clean_jsonl(lines, ("id", "text", "label"), "text")
    assert t is not None and t.column("text").to_pylist() == [f" good {i}" for i in range(5)]
    assert sources._parse_clean_jsonl(lines[:2] + [b"\n"] + lines[2:], ("id", "text", "label"), "text") is None


def test_py_whitespace_is_what_str_strip_removes():
    assert set(PY_WHITESPACE) == {c for c in map(chr, range(0x110000)) if c.isspace()}


def test_typed_columns_checked_column_wise_equal_row_wise(monkeypatch):
    """Parquet: an int label, a large_string text; a null text in a later block is still named by its row."""
    fmt = sources.FileFormat(kind="parquet", files=("f.parquet",), name="f.parquet", stem="f", has_id=False,
                             has_label=True)
    blocks = [pa.table({"text": pa.array([f"t{i}" for i in range(4)], pa.large_string()), "label": [1, 2, 1, 2],
                        "__row": range(4), "__i": range(4)}),
              pa.table({"text": pa.array(["t4", None, " \u3000"], pa.large_string()), "label": [1, 2, 1],
                        "__row": range(4, 7), "__i": range(4, 7)})]
    check = CheckRows(fmt, "text", "label", "id", seed=0)
    assert check._clean(blocks[0]) is not None and check._clean(blocks[1]) is None
    fast = [check(b).to_pylist() for b in blocks]
    monkeypatch.setattr(CheckRows, "_clean", lambda self, raw: None)
    assert fast == [check(b).to_pylist() for b in blocks]
    assert [r["error"] for r in fast[1]] == [None, "f.parquet: row 5: missing value in text column 'text'",
                                               "f.parquet: row 6: empty text"]
