"""Writes the results tables of docs/results.md (and README.md's headline) from benchmarks/results/*.json.

Each block between `<!-- results:<name>:begin -->` and `<!-- results:<name>:end -->` is rendered from
`benchmarks/results/<name>.json` by the benchmark's own `render(result)` (the function its script uses for
its .md), so a number in these tables is in a results file. Only the blocks are rewritten; the text around
them is kept.

    python benchmarks/report.py           # rewrite every block in place
    python benchmarks/report.py --check   # exit 1, one line per stale block

Fast and without Ray: the benchmark scripts import torch, Ray and muki_ray inside their functions only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS = [ROOT / "docs" / "results.md", ROOT / "README.md"]
BLOCK = re.compile(r"(<!-- results:([\w.+-]+):begin -->\n)(.*?)(<!-- results:\2:end -->)", re.DOTALL)

# results file -> the script that writes it and renders it (reproduce_* is dispatched by content, see renderer)
SCRIPTS = {"selection": "selection", "selection_candidates": "selection_candidates", "shares": "shares",
           "throughput": "throughput", "student_throughput": "student_throughput",
           "student_profile": "profile_student", "student_memory": "student_memory", "scale": "scale",
           "grow": "grow", "gpu_check": "gpu_check", "cross_corpus": "cross_corpus", "mc_depth": "mc_depth"}


def renderer(name: str, result: dict):
    """The `render` function of the script that wrote results/<name>.json."""
    if name.startswith("reproduce_"):
        if result.get("driver") == "benchmarks/reproduce_resume.py":
            script = "reproduce_resume"
        else:
            script = "reproduce_setups" if "setup" in result else "reproduce"
    else:
        script = SCRIPTS.get(name, name)
    module = importlib.import_module(script)
    if not hasattr(module, "render"):
        raise SystemExit(f"benchmarks/{script}.py has no render(result) for results/{name}.json")
    return module.render


def load(name: str, results: Path = RESULTS) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f} ({row['seeds']} seeds)"


def headline(results: Path = RESULTS) -> str:
    """README's headline table: per dataset, the default recipe against the paper's MUKI, oracle selection and
    the supervised bound (student test accuracy, mean ± std over seeds)."""
    md = ["| dataset | default recipe | paper's MUKI | oracle selection | supervised bound |", "|---|---|---|---|---|"]
    for name, title in (("reproduce_bbc_news", "BBC News"), ("reproduce_20newsgroups", "20 Newsgroups")):
        result = load(name, results)
        if result is None:
            continue
        by = {r["method"]: r for r in result["rows"]}
        md.append(f"| {title} | " + " | ".join(_cell(by.get(m)) for m in
                                                ("default", "muki_soft+reweight", "oracle", "supervised")) + " |")
    return "\n".join(md)


def render(name: str, results: Path = RESULTS) -> str:
    """The Markdown of block <name>: its results file's tables, or a line saying it has not run yet."""
    if name == "headline":
        return headline(results)
    result = load(name, results)
    if result is None:
        script = SCRIPTS.get(name, name)
        return f"*Not run yet*: `python benchmarks/{script}.py` writes `benchmarks/results/{name}.json`."
    return renderer(name, result)(result)


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, current content) of every results block in a Markdown text."""
    return [(m.group(2), m.group(3)) for m in BLOCK.finditer(text)]


def fill(text: str, results: Path = RESULTS) -> str:
    """The text with every results block rendered anew."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), results) + "\n" + m.group(4), text)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a block differs from its results file")
    args = ap.parse_args(argv)
    stale = 0
    for path in (p for p in DOCS if p.exists()):
        text = path.read_text()
        new = fill(text)
        if args.check:
            for (name, old), (_, cur) in zip(blocks(text), blocks(new)):
                if old != cur:
                    stale += 1
                    print(f"{path.relative_to(ROOT)}: results:{name} is stale (run python benchmarks/report.py)")
        elif new != text:
            write_atomic(path, new)
            print(f"updated {path.relative_to(ROOT)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
