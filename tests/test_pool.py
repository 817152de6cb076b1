"""The predictions join of one bucket (`pool.join_bucket`), in-process: what it writes, and what
it keeps of an earlier join when the pool grows. The pool stage of a JSONL pool that grew at its
end: only the new lines read and written (Ray Data)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muki_ray.config.labels import LabelSpace
from muki_ray.config.schema import parse_config
from muki_ray.core.manifest import read_manifest
from muki_ray.data.pool import join_bucket, text_hash
from muki_ray.data.sources import BLOCK_ROWS, DataError, file_state
from muki_ray.run.pipeline import pool_stage

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


# ------------------------------------------------------------------ a pool that grew at its end
def pool_lines(start: int, n: int, ids: bool = True) -> str:
    return "".join(json.dumps({**({"id": f"d{i}"} if ids else {}), "text": f"text number {i}"}) + "\n"
                   for i in range(start, start + n))


def pool_cfg(tmp_path: Path, pool: Path, tiny_models, **data):
    cfg = parse_config({"output_dir": str(tmp_path / "run"), "data": {"pool": {"source": str(pool)}, "buckets": 4, **data},
                        "teachers": [{"name": "a", "model": str(tiny_models["news"])}],
                        "student": {"model": str(tiny_models["student"])}})
    return cfg, LabelSpace.from_teachers({"a": ["business", "politics"]})


def pool_table(run: Path) -> pa.Table:
    return pq.read_table(run / "pool" / "data").select(["id", "text", "text_hash"]).sort_by("id")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ids", [True, False], ids=["ids", "derived-ids"])
def test_an_appended_pool_reads_only_its_new_lines_and_equals_a_full_read(tmp_path, tiny_models, ray_session, ids):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(pool_lines(0, 200, ids))
    cfg, space = pool_cfg(tmp_path, pool, tiny_models)
    run = tmp_path / "run"
    first = pool_stage(cfg, space, run)
    assert first["rows"] == 200 and first["rows_kept"] == 0 and first["source_file"] == file_state(pool)
    old_files = {f.name for f in (run / "pool" / "data").rglob("*.parquet")}
    with open(pool, "a") as f:
        f.write(pool_lines(200, 20, ids) + "\n" + pool_lines(220, 5, ids))  # a blank line among them
    grown = pool_stage(cfg, space, run)
    assert grown["rows"] == 225 and grown["rows_kept"] == 200
    files = list((run / "pool" / "data").rglob("*.parquet"))
    assert old_files <= {f.name for f in files}  # the earlier files, linked
    new_ids = {i for f in files if f.name not in old_files for i in pq.read_table(f).column("id").to_pylist()}
    assert len(new_ids) == 25 and not (run / ".pool.previous").exists()
    if not ids:  # derived ids go on from the earlier records (the blank line is not one)
        assert new_ids == {f"pool:{i}" for i in range(200, 225)}
    grown_table = pool_table(run)
    shutil.rmtree(run / "pool")
    full = pool_stage(cfg, space, run)
    assert full["rows_kept"] == 0 and full["fingerprint"] == grown["fingerprint"]
    assert pool_table(run).equals(grown_table)


@pytest.mark.timeout(240)
def test_an_appended_bad_line_is_named_by_its_line_and_a_changed_file_is_read_whole(tmp_path, tiny_models,
                                                                                       ray_session):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(pool_lines(0, 100))
    cfg, space = pool_cfg(tmp_path, pool, tiny_models)
    run = tmp_path / "run"
    first = pool_stage(cfg, space, run)
    grown = 2 * BLOCK_ROWS + 2  # the appended lines span several blocks: line numbers go on across them
    with open(pool, "a") as f:
        f.write(pool_lines(100, grown) + json.dumps({"id": "bad", "text": " "}) + "\n")
    with pytest.raises(DataError, match=rf"pool.jsonl: line {101 + grown}: empty text"):
        pool_stage(cfg, space, run)
    assert read_manifest(run / ".pool.previous")["fingerprint"] == first["fingerprint"]  # kept for the rerun
    pool.write_text(pool_lines(0, 100 + grown))  # the bad line removed: still an append
    assert pool_stage(cfg, space, run)["rows_kept"] == 100
    os.utime(pool)  # touched, the same bytes: nothing read, everything kept
    same = pool_stage(cfg, space, run)
    assert same["rows_kept"] == 100 + grown and same["rows"] == 100 + grown
    lines = pool.read_text().splitlines(keepends=True)
    lines[3] = json.dumps({"id": "d3", "text": "an edited text"}) + "\n"
    pool.write_text("".join(lines) + pool_lines(100 + grown, 1))  # an earlier line changed: read whole
    changed = pool_stage(cfg, space, run)
    assert changed["rows_kept"] == 0 and changed["rows"] == 101 + grown
    assert "an edited text" in pool_table(run).column("text").to_pylist()
    with open(pool, "a") as f:
        f.write(json.dumps({"id": "d7", "text": "a duplicate id"}) + "\n")
    with pytest.raises(DataError, match="duplicate id 'd7'"):
        pool_stage(cfg, space, run)
