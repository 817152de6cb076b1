"""Shared benchmark plumbing: real BBC texts, a MiniLM-L6 classifier folder, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"


def hardware() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{'cuda' if torch.cuda.is_available() else 'cpu only'}"


def table(src):
    """A built-in source's part as an Arrow table (benchmarks only read the bounded built-ins)."""
    from muki_ray.data.sources import builtin_part

    return builtin_part(src.source, src.split, src.part, src.limit, 0)


def bbc_texts(n: int, split: str = "train") -> list[str]:
    from muki_ray.config.schema import Source

    return table(Source(source="bbc_news", split=split, limit=n)).column("text").to_pylist()


def minilm_classifier(folder: Path, labels: list[str]) -> Path:
    """MiniLM-L6 with a fresh head over `labels`, saved as a from_pretrained folder (timing only)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from muki_ray.core.hf_folder import resolve_model_path

    if (folder / "config.json").exists():
        return folder
    base = resolve_model_path("builtin:minilm-l6")
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def markdown_table(rows: list[tuple]) -> str:
    """A Markdown table: the first row is the header, every cell through str()."""
    md = ["| " + " | ".join(map(str, rows[0])) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(md + ["| " + " | ".join(map(str, r)) + " |" for r in rows[1:]])


def write_results(name: str, data: dict, table_rows: list[tuple], headline: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {**data, "hardware": hardware(), "headline": headline}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    md = [markdown_table(table_rows), ""]
    md.append(f"Hardware: {data['hardware']}. {headline}")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
