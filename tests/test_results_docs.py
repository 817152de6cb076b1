"""docs/results.md (and README.md's headline) agree with benchmarks/results/*.json (issue #37)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

DOCS = [p for p in (ROOT / "docs" / "results.md", ROOT / "README.md") if p.exists()]


def _blocks():
    return [pytest.param(p.relative_to(ROOT).as_posix(), name, content, id=f"{p.name}:{name}")
            for p in DOCS for name, content in report.blocks(p.read_text())]


def test_results_doc_has_every_results_file():
    names = {b.values[1] for b in _blocks()}
    missing = {p.stem for p in report.RESULTS.glob("*.json")} - names
    assert not missing, f"results files without a block in docs/results.md: {sorted(missing)}"
    assert "headline" in names


@pytest.mark.parametrize("doc,name,content", _blocks())
def test_block_is_current(doc, name, content):
    assert content == report.render(name) + "\n", f"{doc}: results:{name} is stale; run python benchmarks/report.py"


def test_renderer_follows_the_results_file(tmp_path):
    """A number changed in a copied results file changes the rendered table (so the tests above can fail)."""
    src = json.loads((report.RESULTS / "reproduce_bbc_news.json").read_text())
    row = next(r for r in src["rows"] if r["method"] == "supervised")
    before = report.render("reproduce_bbc_news")
    assert f"{row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f}" in before
    row["test_acc_mean"] = 0.1234
    (tmp_path / "reproduce_bbc_news.json").write_text(json.dumps(src))
    after = report.render("reproduce_bbc_news", tmp_path)
    assert "| supervised | 3 | 0.1234 ±" in after and after != before
    assert f"| 0.1234 ± {row['test_acc_std']:.4f} (3 seeds) |" in report.headline(tmp_path)


def test_fill_rewrites_only_blocks_and_reports_missing_files(tmp_path):
    shutil.copy(report.RESULTS / "selection.json", tmp_path)
    text = ("intro 1\n<!-- results:selection:begin -->\nold 0.999\n<!-- results:selection:end -->\n"
            "<!-- results:mc_depth:begin -->\n<!-- results:mc_depth:end -->\noutro\n")
    new = report.fill(text, tmp_path)
    assert new.startswith("intro 1\n<!-- results:selection:begin -->\n| dataset |") and new.endswith("outro\n")
    assert "0.999" not in new and "*Not run yet*: `python benchmarks/mc_depth.py`" in new
    assert report.fill(new, tmp_path) == new


def test_benchmarks_without_results_yet_have_a_renderer(tmp_path):
    """mc_depth and cross_corpus have no results file yet: when theirs lands, report.py renders it."""
    row = {"variant": "exact", "layers": 6, "seconds": 12.5, "speedup": 1.0, "agreement": 1.0,
           "selection_accuracy": 0.61, "supervision_accuracy": 0.6}
    piece = {"sizes": {"texts": 200}, "teachers": ["t1", "t2"], "depth": 6, "threads": 2, "hardware": "cpu",
             "commits": ["abc"], "missing": [], "rows": [row, {**row, "variant": "layers 1", "layers": 1,
                                                               "speedup": 4.19, "agreement": 0.9437,
                                                               "disagreements": 11}]}
    (tmp_path / "mc_depth.json").write_text(json.dumps({"datasets": {"bbc_news": piece}, "missing": ["20newsgroups"],
                                                        "recommended": {"layers": None, "why": "none holds"},
                                                        "tolerance": 0.005}))
    md = report.render("mc_depth", tmp_path)
    assert "| layers 1 | 1 | 12.5 | 4.19 | 0.944 | 11 | 0.610 | 0.600 |" in md and "Pieces missing: 20newsgroups" in md
    teachers = {"t1": 0.98, "ng_sci": 0.9}
    r = {"method": "default", "selection_acc": 0.8, "supervision_acc": 0.75, "student_acc": 0.7,
         "per_teacher_acc": {"t1": 0.9, "ng_sci": 0.5}, "per_teacher": {t: {"recall": 0.5} for t in teachers}}
    (tmp_path / "cross_corpus.json").write_text(json.dumps(
        {"commit": "abc", "hardware": "cpu", "minority": 0.1, "samples": 16, "student_epochs": 2,
         "own_accuracy": teachers, "sizes": {"pool": {"rows": 300, "ng_rows": 30}, "test": {"rows": 500, "ng_rows": 50}},
         "rows": [r], "goals": ["default ≥ paper's preset: met"]}))
    md = report.render("cross_corpus", tmp_path)
    assert "| default | 0.800 | 0.750 | 0.700 | 0.900 | 0.500 | 0.500 | 0.500 |" in md and "- default ≥ paper" in md


def test_mc_depth_keeps_exact_mc_until_the_pieces_can_resolve_the_depth():
    """The rule's pick stands only where one standard error of an agreement difference is within the
    tolerance: at 200 texts a floor of 0.98 cannot tell 0.975 from it; at 2,000 texts it can."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mc_depth

    def piece(texts, agreements):
        rows = [{"variant": "exact, other seed", "agreement": 0.98}] + \
            [{"variant": f"layers {n}", "agreement": a} for n, a in enumerate(agreements, 1)]
        return {"sizes": {"texts": texts}, "depth": 4, "missing": [], "rows": rows}

    small = {d: piece(200, [0.95, 0.975, 0.98]) for d in mc_depth.DATASETS}
    rec = mc_depth.recommend(small, 0.005)
    assert rec["layers"] is None and rec["rule_pick"] == 2 and "1,600 texts" in rec["why"]
    large = {d: piece(2000, [0.95, 0.975, 0.98]) for d in mc_depth.DATASETS}
    assert mc_depth.recommend(large, 0.005)["layers"] == 2
    assert mc_depth.recommend({d: piece(2000, [0.9, 0.9, 0.9]) for d in mc_depth.DATASETS}, 0.005)["layers"] is None
