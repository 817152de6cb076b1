"""The pool, checked once and spread over hash buckets of the id; the bucket-by-bucket work on it.

RUN_DIR/pool/data/bucket=B/*.parquet holds {id, text, [label], text_hash}, with B = hash(id) mod
`data.buckets`. Every teacher cache uses the same buckets, so the work that needs all of a row's
pieces at once is done bucket by bucket, each bucket by one task that reads only its own files:
the pool's statistics, the rows a teacher still has to compute (an anti-join on its cache), and
the join of the teachers' predictions. That is a partition-wise join: no stage shuffles the pool,
no task holds more than one bucket, and the driver sees per-bucket counts only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from muki_ray.data.sources import DataError, hash64, io_write

ROWS_PER_FILE = 100_000           # rows per written file (before the split by bucket)
JOIN_REMOTE_ARGS = {"num_cpus": 0.5}  # a bucket task: pyarrow reads and joins of one bucket


def bucket_of(ids, buckets: int) -> np.ndarray:
    """(B,) ids -> (B,) int32 bucket numbers in [0, buckets)."""
    return (hash64(ids, salt="bucket:") % np.uint64(buckets)).astype(np.int32)


def text_hash(texts) -> np.ndarray:
    """(B,) texts -> (B,) int64: a row's cached predictions are reused only for the same text."""
    return hash64(texts, salt="text:").view(np.int64)


def add_keys(batch: pa.Table, buckets: int) -> pa.Table:
    """Ray Data batch function: {id, text, ...} -> the same plus text_hash and bucket."""
    ids = batch.column("id").to_pylist()
    return batch.append_column("text_hash", pa.array(text_hash(batch.column("text").to_pylist()))) \
        .append_column("bucket", pa.array(bucket_of(ids, buckets)))


def write_bucketed(ds, path: Path) -> None:
    """Write a dataset with a `bucket` column as PATH/bucket=B/*.parquet, in files of about
    ROWS_PER_FILE rows (blocks are merged first, streaming, so small blocks make no small files)."""
    ds.repartition(target_num_rows_per_block=ROWS_PER_FILE, strict=True) \
        .write_parquet(str(path), partition_cols=["bucket"], **io_write())


def bucket_files(root: Path, bucket: int) -> list[str]:
    """The parquet files of one bucket under a folder written by `write_bucketed`."""
    d = Path(root) / f"bucket={bucket}"
    return sorted(str(p) for p in d.glob("*.parquet")) if d.is_dir() else []


def read_bucket(root: Path, bucket: int, columns: list[str], schema: Optional[pa.Schema] = None) -> pa.Table:
    """One bucket of a bucketed folder as one table (empty, with `schema`, when it has no file)."""
    files = bucket_files(root, bucket)
    if not files:
        return schema.empty_table() if schema is not None else pa.table({c: [] for c in columns})
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def over_buckets(fn: Callable, buckets: int, remote_args: Optional[dict] = None, **fn_kwargs):
    """A Ray Dataset of FN's outputs, one table per bucket.

    fn(bucket: int, **fn_kwargs) -> pa.Table. Each call reads only its bucket's files. The buckets
    are dealt to as many tasks as the cluster runs at once (one wave), and a task yields one
    bucket's table at a time (Ray Data cuts its output into blocks of its target size): a task per
    bucket costs more in Ray's per-task overhead than the bucket's own work (the predictions join of
    a 55k-row pool in 32 buckets on 2 CPUs: 4.5-8.4 s with a task per bucket, 1.9 s in 2 tasks,
    1.05 s in one process).
    """
    options = remote_args or JOIN_REMOTE_ARGS
    per = -(-buckets // max(1, min(buckets, concurrent_tasks(options))))

    def call(batch: pa.Table):
        for b in batch.column("id").to_pylist():
            yield fn(int(b), **fn_kwargs)

    # from_items, not range: a read task would ask for a CPU that a teacher's actors may hold.
    return ray.data.from_items([{"id": b} for b in range(buckets)], override_num_blocks=-(-buckets // per)) \
        .map_batches(call, batch_format="pyarrow", batch_size=per, **options)


def concurrent_tasks(options: dict) -> int:
    """How many tasks with these map_batches options the cluster runs at once."""
    size = getattr(options.get("compute"), "size", None)
    if size:
        return int(size)
    cpus, need = ray.cluster_resources().get("CPU", 1.0), float(options.get("num_cpus", 1.0))
    return max(1, int(cpus // need) if need > 0 else int(cpus))


# ------------------------------------------------------------- the pool stage's work
def bucket_stats(bucket: int, root: str, labeled: bool) -> pa.Table:
    """One pool bucket -> one row {bucket, rows, digest, duplicate, labels}.

    digest: sha256 over the bucket's ids and text hashes in id order, so the pool's fingerprint
    does not depend on files, blocks or row order. duplicate: an id that occurs twice (ids of one
    bucket all hash alike, so a duplicate never spans two buckets).
    """
    cols = ["id", "text_hash"] + (["label"] if labeled else [])
    t = read_bucket(Path(root), bucket, cols)
    t = t.sort_by("id") if t.num_rows else t
    ids = t.column("id").combine_chunks() if t.num_rows else pa.array([], pa.string())
    n, dup = len(ids), None
    if n > 1:  # sorted: a duplicate sits next to itself
        same = pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        dup = ids[int(same.argmax()) + 1].as_py() if same.any() else None
    # Column-wise (no hashing call per row): the ids' lengths, the ids, the text hashes.
    h = hashlib.sha256(pc.binary_length(ids).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
    h.update("".join(ids.to_pylist()).encode("utf-8", "surrogatepass"))
    h.update(t.column("text_hash").to_numpy().astype("<i8").tobytes() if n else b"")
    labels = {}
    if labeled and t.num_rows:
        counts = pc.value_counts(t.column("label")).to_pylist()
        labels = {c["values"]: c["counts"] for c in counts}
    return pa.table({"bucket": [bucket], "rows": [t.num_rows], "digest": [h.hexdigest()],
                     "duplicate": pa.array([dup], pa.string()), "labels": [json.dumps(labels)]})


def pool_summary(root: Path, buckets: int, labeled: bool, where: str) -> dict:
    """{rows, fingerprint, labels, bucket_rows} of a written pool; DataError on a duplicate id."""
    parts = []
    for b in over_buckets(bucket_stats, buckets, root=str(root), labeled=labeled).iter_batches(
            batch_format="pyarrow", batch_size=None):
        parts += b.to_pylist()
    parts.sort(key=lambda r: r["bucket"])
    dup = next((r["duplicate"] for r in parts if r["duplicate"] is not None), None)
    if dup is not None:
        raise DataError(f"{where}: duplicate id {dup!r}")
    labels: dict[str, int] = {}
    for r in parts:
        for k, v in json.loads(r["labels"]).items():
            labels[k] = labels.get(k, 0) + v
    digest = hashlib.sha256("".join(r["digest"] for r in parts).encode()).hexdigest()[:16]
    return {"rows": sum(r["rows"] for r in parts), "fingerprint": digest, "labels": dict(sorted(labels.items())),
            "bucket_rows": [r["rows"] for r in parts]}


def missing_rows(bucket: int, pool_root: str, parts: list[str]) -> pa.Table:
    """The rows of one pool bucket that no cache part holds (an anti-join on id and text hash)."""
    pool = read_bucket(Path(pool_root), bucket, ["id", "text", "text_hash"])
    cached = [read_bucket(Path(p), bucket, ["id", "text_hash"]) for p in parts]
    cached = [c for c in cached if c.num_rows]
    if cached and pool.num_rows:
        pool = pool.join(pa.concat_tables(cached), keys=["id", "text_hash"], join_type="left anti")
    return pool.append_column("bucket", pa.array(np.full(pool.num_rows, bucket, dtype=np.int32)))


KEYS = ["id", "text_hash"]


def first_per_key(t: pa.Table) -> pa.Table:
    """Rows of `t` with the first occurrence of each (id, text_hash) (a row computed twice is kept once)."""
    idx = t.select(KEYS).append_column("__i", pa.array(np.arange(t.num_rows))) \
        .group_by(KEYS, use_threads=False).aggregate([("__i", "min")]).column("__i_min")
    return t.take(idx)


def match(left: pa.Table, right: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (i, j) with equal (id, text_hash) keys; only key columns enter the hash join."""
    li = left.select(KEYS).append_column("__i", pa.array(np.arange(left.num_rows)))
    ri = right.select(KEYS).append_column("__j", pa.array(np.arange(right.num_rows)))
    m = li.join(ri, keys=KEYS, join_type="inner", use_threads=False)
    return m.column("__i").to_numpy(), m.column("__j").to_numpy()


def cached_keys(parts: list[str], bucket: int) -> Optional[pa.Table]:
    """A teacher's keys in one bucket, one per key, with `node` and where each row is stored
    (`__part`, `__row`); None when no part holds a row of the bucket."""
    keys = [read_bucket(Path(p), bucket, KEYS + ["node"]) for p in parts]
    if not sum(k.num_rows for k in keys):
        return None
    where = np.concatenate([np.full(k.num_rows, n) for n, k in enumerate(keys)])
    row = np.concatenate([np.arange(k.num_rows) for k in keys])
    return first_per_key(pa.concat_tables(keys).append_column("__part", pa.array(where))
                         .append_column("__row", pa.array(row)))


def cached_columns(cached: pa.Table, j: np.ndarray, parts: list[str], bucket: int, columns: list[str]) -> pa.Table:
    """COLUMNS of the cached rows j of a teacher (`cached_keys`), in j's order. Only the parts that
    hold some of them are read."""
    part, row = cached.column("__part").to_numpy()[j], cached.column("__row").to_numpy()[j]
    grouped = np.argsort(part, kind="stable")  # j's positions, part by part
    tables = [read_bucket(Path(parts[p]), bucket, columns).take(pa.array(row[part == p])) for p in np.unique(part)]
    inverse = np.empty_like(grouped)
    inverse[grouped] = np.arange(len(grouped))
    return pa.concat_tables(tables).take(pa.array(inverse))


def kept_files(previous: Optional[str], bucket: int, pool: pa.Table,
               columns: list[str]) -> tuple[list[str], np.ndarray]:
    """The files of the previous predictions' bucket that stay as they are, and which pool rows
    they do not hold (a mask over POOL).

    They stay when every row they hold is still in the pool bucket with the same text, and they
    hold exactly `columns` (the same teachers, the same pool columns): a grown pool then writes
    only its new rows. Otherwise nothing is kept (the bucket is written whole)."""
    every = np.ones(pool.num_rows, dtype=bool)
    files = sorted(str(f) for f in Path(previous).glob(f"part-{bucket:05d}*.parquet")) if previous else []
    if not files or any(pq.read_schema(f).names != columns for f in files):
        return [], every
    same = KEYS + (["label"] if "label" in columns else [])  # a relabeled row is rewritten too
    old = same_as(pa.concat_tables([pq.read_table(f, columns=same) for f in files]))
    if old.join(same_as(pool.select(same)), keys=same, join_type="left anti", use_threads=False).num_rows:
        return [], every
    held = pool.select(KEYS).append_column("__i", pa.array(np.arange(pool.num_rows))) \
        .join(old.select(KEYS), keys=KEYS, join_type="inner", use_threads=False).column("__i").to_numpy()
    every[held] = False
    return files, every


def same_as(t: pa.Table) -> pa.Table:
    """T with its missing labels as one value, so that a join matches them."""
    i = t.schema.get_field_index("label")
    return t if i < 0 else t.set_column(i, "label", pc.fill_null(t.column("label").cast(pa.string()), "\0"))


def link_all(src_root: Path, dst_root: Path) -> None:
    """Every bucket file under SRC_ROOT hard-linked into the same bucket under DST_ROOT."""
    for f in sorted(Path(src_root).glob("bucket=*/*.parquet")):
        dst = Path(dst_root) / f.parent.name
        dst.mkdir(parents=True, exist_ok=True)
        link(str(f), dst / (f.name if not (dst / f.name).exists() else f"previous-{f.name}"))


def link(src: str, dst: Path) -> None:
    """DST as a hard link to SRC (a copy where the file system has none)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def join_bucket(bucket: int, pool_root: str, teachers: list, out_dir: str, labeled: bool,
                previous: Optional[str] = None) -> pa.Table:
    """Write one bucket of the predictions: pool rows joined with every teacher's cached columns.

    teachers: [(name, [cache part folders], [its column names])] in config order. Writes
    OUT_DIR/part-BBBBB[-N].parquet {id, text, [label], text_hash, teachers' columns} and returns
    one row {bucket, rows, kept, missing, nodes}: `missing` names a teacher and a pool id its cache
    lacks (the driver raises), `nodes` counts each teacher's rows by the node that computed them.

    previous: the predictions folder of an earlier run with the same teachers. Its files of this
    bucket that the pool still holds whole are linked, not rewritten (`kept_files`), and only the
    pool's other rows are joined and written, in a file of their own: a pool grown by new rows
    costs their join and write, not the pool's. Each teacher's keys are read first, so only the
    cache parts that hold the written rows are read whole.
    """
    cols = ["id", "text"] + (["label"] if labeled else []) + ["text_hash"]
    pool = read_bucket(Path(pool_root), bucket, cols)
    pool = pool.sort_by("id") if pool.num_rows else pool
    kept, new = kept_files(previous, bucket, pool, cols + [c for _, _, cs in teachers for c in cs]) \
        if pool.num_rows else ([], np.zeros(0, dtype=bool))
    out, nodes, missing = pool.filter(pa.array(new)), {}, None
    for name, parts, tcols in teachers if pool.num_rows else []:
        cached = cached_keys(parts, bucket)
        i, j = match(pool, cached) if cached is not None else (np.zeros(0, int), np.zeros(0, int))
        if len(i) < pool.num_rows:
            absent = np.setdiff1d(np.arange(pool.num_rows), i)[0]
            missing = f"teacher {name!r}: its cache lacks pool id {pool.column('id')[int(absent)].as_py()!r}"
            break
        j = j[np.argsort(i)]  # each pool row's cached row
        counts = pc.value_counts(cached.column("node").take(pa.array(j))).to_pylist()
        nodes[name] = {c["values"]: c["counts"] for c in counts}
        if out.num_rows:
            picked = cached_columns(cached, j[new], parts, bucket, tcols)
            for c in tcols:
                out = out.append_column(c, picked.column(c))
    if missing is None and out.num_rows:
        pq.write_table(out, str(Path(out_dir) / f"part-{bucket:05d}{f'-{len(kept)}' if kept else ''}.parquet"))
    for f in kept:
        link(f, Path(out_dir) / Path(f).name)
    return pa.table({"bucket": [bucket], "rows": [pool.num_rows],
                     "kept": [pool.num_rows - out.num_rows if kept else 0],
                     "missing": pa.array([missing], pa.string()), "nodes": [json.dumps(nodes)]})
