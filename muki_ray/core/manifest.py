"""Stage outputs and manifests under RUN_DIR/<stage>/.

A stage writes its outputs into a temporary sibling folder, renames it into place, and writes
`manifest.json` last. A stage folder without a manifest is partial (a crash) and is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

MANIFEST = "manifest.json"


def fingerprint(obj: Any) -> str:
    """Stable short hash of JSON-able data (config sections, input fingerprints)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def folder_fingerprint(folder: Path) -> str:
    """Content hash of a folder's files (names, sizes and bytes)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def read_manifest(stage_dir: Path, name: str = MANIFEST) -> Optional[dict]:
    """A stage folder's manifest (or another JSON file in it); None when missing or unreadable."""
    p = Path(stage_dir) / name
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None  # name the file, not its .tmp


def begin_stage(stage_dir: Path) -> Path:
    """Start RUN_DIR/<stage>/ empty: whatever an interrupted or outdated run left there is removed,
    so no partial file is ever read, and the missing manifest marks the stage as incomplete."""
    stage_dir = Path(stage_dir)
    if stage_dir.is_symlink():
        stage_dir.unlink()  # a stage shared from another run directory is never written through
    elif stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    return stage_dir


def set_aside(stage_dir: Path, value: str, key: str = "config_hash") -> Optional[Path]:
    """The complete output of an earlier run of this stage whose manifest has the same KEY (the
    config hash, or another key the stage writes), moved to RUN_DIR/.<stage>.previous before
    `begin_stage` empties the stage, so the new output can reuse its files; None when there is
    none. The caller removes it once its own output is complete: a crash in between leaves it
    there, and the rerun finds it again."""
    stage_dir = Path(stage_dir)
    aside = stage_dir.parent / f".{stage_dir.name}.previous"
    done = read_manifest(stage_dir)
    if done is not None and not stage_dir.is_symlink():  # a shared stage is another run's: never moved
        shutil.rmtree(aside, ignore_errors=True)
        if done.get(key) == value:
            os.replace(stage_dir, aside)
    kept = read_manifest(aside)
    if kept is None or kept.get(key) != value:
        shutil.rmtree(aside, ignore_errors=True)
        return None
    return aside


@contextlib.contextmanager
def stage_output(stage_dir: Path, name: str) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces RUN_DIR/<stage>/<name>."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / MANIFEST).unlink(missing_ok=True)
    final = stage_dir / name
    tmp = stage_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def finish_stage(stage_dir: Path, *, config_hash: str, inputs: dict, rows: Optional[int], started: float,
                 extra: Optional[dict] = None) -> dict:
    """Write the manifest last: config hash, input fingerprints, row count, wall time."""
    info = {"config_hash": config_hash, "inputs": inputs, "rows": rows, "output_id": uuid.uuid4().hex,
            "wall_time_s": round(time.time() - started, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if extra:
        info.update(extra)
    write_json_atomic(Path(stage_dir) / MANIFEST, info)
    return info


def is_current(stage_dir: Path, config_hash: str, inputs: dict) -> bool:
    """A complete stage whose config section and inputs are unchanged (it can be skipped)."""
    m = read_manifest(stage_dir)
    return m is not None and m.get("config_hash") == config_hash and m.get("inputs") == inputs
