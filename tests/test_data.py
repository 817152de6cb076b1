"""Data sources: round-trips, bad rows (error and skip), split parts, built-in counts."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muki_ray.config import Source
from muki_ray.data import DataError, check_labels, read_source, stratified_order

ROWS = [{"id": f"r{i}", "text": f"text number {i}", "label": "ab"[i % 2]} for i in range(10)]


def src(path, **kw):
    return Source(source=str(path), **kw)


def as_rows(table):
    return sorted(table.to_pylist(), key=lambda r: r["id"])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_roundtrip(tmp_path):
    t = read_source(src(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert as_rows(t) == sorted(ROWS, key=lambda r: r["id"])


def test_csv_roundtrip_with_column_mapping(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("doc,body,topic\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in ROWS))
    t = read_source(src(p, columns={"id": "doc", "text": "body", "label": "topic"}))
    assert as_rows(t) == sorted(ROWS, key=lambda r: r["id"])


def test_parquet_roundtrip_and_derived_ids(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}), p)
    t = read_source(src(p))
    assert sorted(t.column("id").to_pylist()) == sorted(f"d:{i}" for i in range(10))
    assert sorted(t.column("text").to_pylist()) == sorted(r["text"] for r in ROWS)


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert as_rows(read_source(src(tmp_path / "one"))) == sorted(ROWS, key=lambda r: r["id"])
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    assert read_source(src(tmp_path / "dict", split="test")).num_rows == 3
    with pytest.raises(DataError, match="split must be one of train, test"):
        read_source(src(tmp_path / "dict", split="nope"))


@pytest.mark.parametrize("content,expected", [
    (b'{"text": "ok"}\n{"text": ""}\n', "line 2: empty text"),
    (b'{"text": "ok"}\n{"text": "   "}\n', "line 2: empty text"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: text is not valid UTF-8"),
    (b'{"text": "ok"}\n{"text": "a"\n', "line 2: not valid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', "line 2: missing value in text column 'text'"),
    (b'{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', "duplicate id '1'"),
    (b'{"body": "x"}\n', "missing text column 'text'"),
    (b"", "no rows"),
])
def test_jsonl_bad_rows_named(tmp_path, content, expected):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=expected) as e:
        read_source(src(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_csv_bad_rows(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_bytes(b"text,label\nfine,a\n,b\ncaf\xe9,a\nok,b\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: empty text"):
        read_source(src(p))
    t = read_source(src(p), on_bad_row="skip")
    assert sorted(t.column("text").to_pylist()) == ["fine", "ok"]


def test_skip_mode_counts(tmp_path, caplog):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": ""}\n{"text": "\xff"}\n{"text": "b"}\n')
    t = read_source(src(p), on_bad_row="skip")
    assert t.num_rows == 2
    assert "skipped 2 bad rows" in caplog.text


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_source(src(tmp_path / "nope.jsonl"))


def test_label_outside_union(tmp_path):
    t = read_source(src(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    check_labels(t, ["a", "b"], "d.jsonl")
    with pytest.raises(DataError, match="d.jsonl: label 'b' is not in the union"):
        check_labels(t, ["a", "c"], "d.jsonl")


def test_parts_are_disjoint_stratified_and_seeded(tmp_path):
    rows = [{"id": f"r{i}", "text": "t", "label": "abc"[i % 3] if i < 240 else "a"} for i in range(300)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    first = read_source(src(p, part=(0.0, 0.5)))
    second = read_source(src(p, part=(0.5, 1.0)))
    a, b = set(first.column("id").to_pylist()), set(second.column("id").to_pylist())
    assert not a & b and len(a | b) == 300
    # Stratified: class shares of each half match the whole (a 140/300, b 80, c 80) within one row.
    for half in (first, second):
        c = Counter(half.column("label").to_pylist())
        assert abs(c["a"] - 70) <= 1 and abs(c["b"] - 40) <= 1 and abs(c["c"] - 40) <= 1
    limited = read_source(src(p, part=(0.0, 0.5), limit=30))
    assert Counter(limited.column("label").to_pylist()) == {"a": 14, "b": 8, "c": 8}
    assert limited.column("id").to_pylist() == first.column("id").to_pylist()[:30]
    again = read_source(src(p, part=(0.0, 0.5)), seed=0)
    other = read_source(src(p, part=(0.0, 0.5)), seed=1)
    assert again.column("id").to_pylist() == first.column("id").to_pylist()
    assert set(other.column("id").to_pylist()) != a


def test_stratified_order_unlabeled_is_a_permutation():
    order = stratified_order(None, 50, seed=3)
    assert sorted(order.tolist()) == list(range(50))
    assert not np.array_equal(order, np.arange(50))


def test_builtin_bbc_counts():
    splits = {s: read_source(Source(source="bbc_news", split=s)) for s in ("train", "dev", "test")}
    ids = [i for t in splits.values() for i in t.column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 2225
    labels = Counter(lab for t in splits.values() for lab in t.column("label").to_pylist())
    assert labels == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert splits["test"].num_rows == 444 and splits["dev"].num_rows == 223


def test_builtin_20newsgroups_counts():
    train = read_source(Source(source="20newsgroups", split="train"))
    dev = read_source(Source(source="20newsgroups", split="dev"))
    test = read_source(Source(source="20newsgroups", split="test"))
    assert train.num_rows + dev.num_rows == 11293 and test.num_rows == 7528
    assert not set(train.column("id").to_pylist()) & set(dev.column("id").to_pylist())
    assert len(set(test.column("label").to_pylist())) == 20


def test_builtin_bad_split():
    with pytest.raises(DataError, match="bbc_news: split must be one of train, dev, test"):
        read_source(Source(source="bbc_news"))


def test_datasets_command(capsys):
    from muki_ray.cli import main

    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "bbc_news: 2225 docs in 5 classes" in out
    assert "test 7528; official train 11293" in out


def test_to_ray_dataset(ray_session, tmp_path):
    from muki_ray.data import to_ray_dataset

    t = read_source(src(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    ds = to_ray_dataset(t)
    assert sorted(r["id"] for r in ds.take_all()) == sorted(r["id"] for r in ROWS)
