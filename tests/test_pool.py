"""The predictions join of one bucket (`pool.join_bucket`), in-process: what it writes, and what
it keeps of an earlier join when the pool grows."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from muki_ray.data.pool import join_bucket, text_hash

TEACHERS = [("t", ["t__p"])]


def write(folder: Path, name: str, rows: list[dict]) -> str:
    (folder / "bucket=0").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(folder / "bucket=0" / name))
    return str(folder)


def pool_rows(texts: dict, labels: dict) -> list[dict]:
    return [{"id": i, "text": t, "label": labels[i], "text_hash": int(text_hash([t])[0])} for i, t in texts.items()]


def cache_rows(texts: dict, node: str, value) -> list[dict]:
    return [{"id": i, "text_hash": int(text_hash([t])[0]), "node": node, "t__p": value(i)} for i, t in texts.items()]


def join(tmp: Path, name: str, pool: str, parts: list[str], previous=None) -> tuple[Path, dict]:
    out = tmp / name
    out.mkdir()
    rec = join_bucket(0, pool, [(n, parts, cols) for n, cols in TEACHERS], str(out), True,
                      previous=previous and str(previous)).to_pylist()[0]
    return out, rec


def test_a_grown_bucket_keeps_the_earlier_file_and_writes_only_its_new_rows(tmp_path):
    texts = {f"d{i}": f"text {i}" for i in range(6)}
    labels = {i: "x" if n % 2 else None for n, i in enumerate(texts)}  # missing labels match each other
    part1 = write(tmp_path / "c1", "a.parquet", cache_rows(texts, "n1", lambda i: float(i[1:])))
    # The first part's row of d0 is the one kept (a row computed twice is taken from the first part).
    part2 = write(tmp_path / "c2", "a.parquet", cache_rows({"d0": "text 0"}, "n2", lambda i: -1.0))
    pool = write(tmp_path / "pool", "a.parquet", pool_rows(texts, labels))
    first, rec = join(tmp_path, "first", pool, [part1, part2])
    assert rec["rows"] == 6 and rec["kept"] == 0 and rec["missing"] is None
    assert sorted(p.name for p in first.iterdir()) == ["part-00000.parquet"]
    t = pq.read_table(first)
    assert t.column_names == ["id", "text", "label", "text_hash", "t__p"]
    assert t.column("id").to_pylist() == sorted(texts) and t.column("t__p").to_pylist() == [0, 1, 2, 3, 4, 5]

    grown = {**texts, "d6": "text 6", "d7": "text 7"}
    part3 = write(tmp_path / "c3", "a.parquet", cache_rows({"d7": "text 7", "d6": "text 6"}, "n3", lambda i: 70.0 + int(i[1:])))
    pool2 = write(tmp_path / "pool2", "a.parquet", pool_rows(grown, {**labels, "d6": "y", "d7": None}))
    out, rec = join(tmp_path, "grown", pool2, [part1, part2, part3], previous=first)
    assert rec["rows"] == 8 and rec["kept"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["part-00000-1.parquet", "part-00000.parquet"]
    assert os.stat(out / "part-00000.parquet").st_ino == os.stat(first / "part-00000.parquet").st_ino  # linked
    new = pq.read_table(out / "part-00000-1.parquet")
    assert new.column("id").to_pylist() == ["d6", "d7"] and new.column("t__p").to_pylist() == [76.0, 77.0]
    assert rec["nodes"] == '{"t": {"n1": 6, "n3": 2}}'  # every row counted, kept or written
    # What a join from scratch writes.
    scratch, _ = join(tmp_path, "scratch", pool2, [part1, part2, part3])
    assert pq.read_table(out).sort_by("id").equals(pq.read_table(scratch))


def test_a_bucket_that_lost_or_changed_a_row_is_written_whole(tmp_path):
    texts = {f"d{i}": f"text {i}" for i in range(4)}
    labels = dict.fromkeys(texts, "x")
    part = write(tmp_path / "c", "a.parquet", cache_rows(texts, "n", lambda i: 1.0)
                 + cache_rows({"d1": "other"}, "n", lambda i: 2.0))
    first, rec = join(tmp_path, "first", write(tmp_path / "p", "a.parquet", pool_rows(texts, labels)), [part])
    assert rec["missing"] is None
    for name, pool_texts, pool_labels in [("dropped", {k: v for k, v in texts.items() if k != "d3"}, labels),
                                          ("changed", {**texts, "d1": "other"}, labels),
                                          ("relabeled", texts, {**labels, "d2": "z"})]:
        pool = write(tmp_path / f"p-{name}", "a.parquet", pool_rows(pool_texts, pool_labels))
        out, rec = join(tmp_path, name, pool, [part], previous=first)
        assert rec["kept"] == 0 and sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"], name
        scratch, _ = join(tmp_path, f"{name}-scratch", pool, [part])
        assert pq.read_table(out).equals(pq.read_table(scratch)), name


def test_a_row_no_cache_part_holds_is_named(tmp_path):
    texts = {"d0": "text 0", "d1": "text 1"}
    part = write(tmp_path / "c", "a.parquet", cache_rows({"d0": "text 0"}, "n", lambda i: 1.0))
    out, rec = join(tmp_path, "out", write(tmp_path / "p", "a.parquet", pool_rows(texts, dict.fromkeys(texts))), [part])
    assert rec["missing"] == "teacher 't': its cache lacks pool id 'd1'" and not list(out.iterdir())


def test_an_earlier_output_is_set_aside_for_the_same_config_and_found_again_after_a_crash(tmp_path):
    from muki_ray.core.manifest import begin_stage, finish_stage, read_manifest, set_aside

    def complete(config_hash):
        stage = begin_stage(tmp_path / "predictions")
        (stage / "data").mkdir()
        (stage / "data" / "part-00000.parquet").write_bytes(b"x")
        finish_stage(stage, config_hash=config_hash, inputs={}, rows=1, started=0.0)

    complete("k1")
    aside = set_aside(tmp_path / "predictions", "k1")
    assert aside == tmp_path / ".predictions.previous" and (aside / "data" / "part-00000.parquet").exists()
    assert not (tmp_path / "predictions").exists()
    begin_stage(tmp_path / "predictions")  # the new run crashes before its manifest: the rerun finds it again
    assert set_aside(tmp_path / "predictions", "k1") == aside and read_manifest(aside)["config_hash"] == "k1"
    assert set_aside(tmp_path / "predictions", "k2") is None and not aside.exists()  # other teachers: dropped
    complete("k1")
    assert set_aside(tmp_path / "predictions", "k2") is None  # a complete output of another config stays
    assert read_manifest(tmp_path / "predictions")["config_hash"] == "k1"
