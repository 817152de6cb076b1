"""The user documentation holds together: links resolve, the README's commands exist, and the
README stays a short user's entry point with no history in it. Fast: no Ray, no network."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
HISTORY = re.compile(r"[0-9a-f]{7}|#[0-9]+")  # commit hashes and issue numbers: CHANGELOG.md only


def _without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def _code(text: str) -> list[str]:
    """The README's code: fenced blocks and inline code spans (the commands table is inline code)."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    spans = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return blocks + spans


def _subcommands() -> set[str]:
    """The `muki-ray` subcommands, from the CLI's argparse parser."""
    from muki_ray.run.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    for phony in re.findall(r"^\.PHONY\s*:(.*)$", text, re.M):
        targets.update(phony.split())
    return targets - {".PHONY"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    missing = []
    for target in LINK.findall(_without_code_blocks(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto, ...; and anchors within the page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)}: links to missing files: {missing}"


def test_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    linked = {Path(t.split("#", 1)[0]).name for t in LINK.findall(text) if t.startswith("docs/")}
    unlinked = [p.name for p in DOCS if p.name not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_commands_exist():
    code = _code(README.read_text(encoding="utf-8"))
    subs, targets = _subcommands(), _make_targets()
    used_subs, used_targets = set(), set()
    for chunk in code:
        for line in chunk.splitlines():
            line = re.sub(r"\s#\s.*$", "", line)  # a shell comment after the command
            for m in re.finditer(r"(?:^|[\s/`(])muki-ray((?:\s+--?[\w-]+)*)\s+([A-Za-z][\w-]*)", line):
                used_subs.add(m.group(2))
            for m in re.finditer(r"(?:^|[\s;&|(`])make\s+([A-Za-z][\w.-]*)", line):
                used_targets.add(m.group(1))
    assert used_subs, "the README shows no muki-ray command"
    assert {"demo", "test"} <= used_targets, "the README must show `make demo` and `make test`"
    assert used_subs <= subs, f"not muki-ray subcommands: {sorted(used_subs - subs)} (known: {sorted(subs)})"
    assert used_targets <= targets, f"not Makefile targets: {sorted(used_targets - targets)}"


def test_readme_first_commands_are_demo_and_test():
    first = FENCE.search(README.read_text(encoding="utf-8")).group(0).splitlines()[1:3]
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines (at most 250: reference material goes to docs/)"


def test_readme_has_no_history():
    hits = [f"{i}: {line}" for i, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1)
            if HISTORY.search(line)]
    assert not hits, "commit hashes or issue numbers in README.md (history goes to CHANGELOG.md):\n" + "\n".join(hits)


def test_results_headline_block():
    text = README.read_text(encoding="utf-8")
    begin, end = "<!-- results:headline:begin -->", "<!-- results:headline:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end)


def test_schema_block_lives_in_config_page():
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert text.count("<!-- schema:start -->") == 1 and text.count("<!-- schema:end -->") == 1


PATH = re.compile(r"(?<![\w/.-])((?:muki_ray|benchmarks|jobs|cluster|tests)/[\w./-]*\w)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_in_the_docs_exist(page: Path):
    """A module, script or config the docs name in code (`muki_ray/method/prototypes.py`) exists: a move
    or a rename that leaves the docs behind fails here."""
    named = set(PATH.findall(page.read_text(encoding="utf-8")))
    # results files come and go with the benchmarks (a block says when one has not run yet)
    missing = sorted(p for p in named if not (REPO / p).exists() and not p.startswith("benchmarks/results/"))
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {missing}"
