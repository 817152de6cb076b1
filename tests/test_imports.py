"""The import direction: the MUKI math stays apart from Ray and the pipeline, the schema apart from
the stages, and the package apart from the scripts around it (read from the source, every import,
lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from muki_ray.embedding import EmbeddingStage
from muki_ray.evaluate import ClassifierStage
from muki_ray.refine_stage import Judge
from muki_ray.stage import Stage
from muki_ray.teachers import TeacherStage

PACKAGE = Path(__file__).resolve().parents[1] / "muki_ray"
MATH = ("integrate", "strategies", "prototypes", "refine", "losses", "mc_dropout", "stats")
STAGES = ("pool", "teachers", "embedding", "combiner", "student", "evaluate", "refine_stage", "pipeline", "schedule")


def imports(module: str) -> set[str]:
    """Every module name `muki_ray/<module>.py` imports, top-level or inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", MATH)
def test_math_imports_neither_ray_nor_the_pipeline(module):
    bad = {n for n in imports(module) if n.split(".")[0] in ("ray", "deepspeed")
           or n.split(".")[0] == "muki_ray" and n.split(".")[1] not in MATH}
    assert not bad, f"muki_ray/{module}.py imports {sorted(bad)}"


def test_config_imports_no_stage():
    bad = {n for n in imports("config") if n.split(".")[0] == "muki_ray" and n.split(".")[1] in STAGES}
    assert not bad, f"muki_ray/config.py imports {sorted(bad)}"


def test_the_package_never_imports_jobs_or_benchmarks():
    for path in PACKAGE.glob("*.py"):
        bad = {n for n in imports(path.stem) if n.split(".")[0] in ("jobs", "benchmarks", "tests")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_no_two_modules_import_each_other():
    deps = {p.stem: {n.split(".")[1] for n in imports(p.stem) if n.startswith("muki_ray.")}
            for p in PACKAGE.glob("*.py")}
    cycles = sorted({tuple(sorted((a, b))) for a, ds in deps.items() for b in ds if a in deps.get(b, set())})
    assert not cycles, f"modules that import each other: {cycles}"


def test_one_stage_idiom():
    """Every Ray Data stage subclasses stage.Stage, and only the pipeline imports the teacher stage."""
    assert all(issubclass(c, Stage) for c in (TeacherStage, EmbeddingStage, ClassifierStage, Judge))
    users = {p.stem for p in PACKAGE.glob("*.py") if "muki_ray.teachers" in imports(p.stem)}
    assert users == {"pipeline"}, users


def test_the_bucket_and_combine_tasks_import_no_torch():
    """A Ray Data task runs in a fresh worker process, which imports the module of its function:
    the pool's bucket tasks and the combiner's tasks need numpy and pyarrow only, and torch would add
    about 2 s of CPU to every such process (the prototypes' embedding actor imports it when it starts)."""
    import subprocess
    import sys

    for module in ("muki_ray.pool", "muki_ray.combiner"):
        out = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "False", (module, out.stdout, out.stderr[-2000:])
