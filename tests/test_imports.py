"""The import direction: the package's folders in data-flow order, each importing only earlier ones;
the MUKI math apart from Ray; the package apart from the scripts around it (read from the source, every
import, lazy ones inside functions included)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from muki_ray.core.stage import Stage
from muki_ray.stages.embedding import EmbeddingStage
from muki_ray.stages.refine_stage import Judge
from muki_ray.stages.teachers import TeacherStage
from muki_ray.student.evaluate import ClassifierStage

PACKAGE = Path(__file__).resolve().parents[1] / "muki_ray"
# The folders in the order data flows through them: a module imports its own folder and earlier ones.
ORDER = ("method", "core", "data", "config", "student", "stages", "run")
MODULES = sorted(p.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
                 for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def imports(module: str) -> set[str]:
    """Every module name `muki_ray/<folder>/<module>.py` imports, top-level or inside a function,
    relative imports resolved."""
    path = PACKAGE / f"{module.replace('.', '/')}.py"
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ["muki_ray", *module.split(".")][:-node.level]
                base = ".".join(parent + ([base] if base else []))
            # `from muki_ray.method import losses` imports the module muki_ray.method.losses
            names |= {f"{base}.{a.name}" if base.count(".") == 1 else base for a in node.names}
    return names


def folder(name: str) -> str | None:
    """'muki_ray.<folder>.<module>' -> '<folder>'; None outside the package."""
    parts = name.split(".")
    return parts[1] if parts[0] == "muki_ray" and len(parts) > 1 else None


def test_every_module_is_in_a_folder_of_the_order():
    assert (PACKAGE / "__init__.py").exists()
    assert {p.name for p in PACKAGE.iterdir() if p.suffix == ".py"} == {"__init__.py"}, "a module outside the folders"
    assert {m.split(".")[0] for m in MODULES} == set(ORDER)
    for f in ORDER:
        doc = ast.get_docstring(ast.parse((PACKAGE / f / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"muki_ray/{f}/__init__.py must say what the folder owns"


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_a_later_folder(module):
    own = ORDER.index(module.split(".")[0])
    bad = {n for n in imports(module) if folder(n) in ORDER and ORDER.index(folder(n)) > own}
    assert not bad, f"muki_ray/{module.replace('.', '/')}.py imports later folders: {sorted(bad)}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("method.")])
def test_the_math_imports_neither_ray_nor_another_folder(module):
    bad = {n for n in imports(module) if n.split(".")[0] in ("ray", "deepspeed")
           or folder(n) not in (None, "method")}
    assert not bad, f"muki_ray/{module.replace('.', '/')}.py imports {sorted(bad)}"


def test_the_package_never_imports_jobs_or_benchmarks():
    for module in MODULES:
        bad = {n for n in imports(module) if n.split(".")[0] in ("jobs", "benchmarks", "tests")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_no_two_modules_import_each_other():
    deps = {m: {".".join(n.split(".")[1:3]) for n in imports(m) if n.startswith("muki_ray.")} for m in MODULES}
    cycles = sorted({tuple(sorted((a, b))) for a, ds in deps.items() for b in ds if a in deps.get(b, set())})
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_direction_check_catches_a_backward_import(tmp_path, monkeypatch):
    """The check reads what it should: a math module importing a stage is reported."""
    fake = tmp_path / "muki_ray"
    (fake / "method").mkdir(parents=True)
    (fake / "method" / "x.py").write_text("def f():\n    from muki_ray.stages.teachers import TeacherStage\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert "muki_ray.stages.teachers" in imports("method.x")
    with pytest.raises(AssertionError, match="later folders"):
        test_no_module_imports_a_later_folder("method.x")


def test_one_stage_idiom():
    """Every Ray Data stage subclasses stage.Stage, and only the pipeline imports the teacher stage."""
    assert all(issubclass(c, Stage) for c in (TeacherStage, EmbeddingStage, ClassifierStage, Judge))
    users = {m for m in MODULES if "muki_ray.stages.teachers" in imports(m)}
    assert users == {"run.pipeline"}, users


def test_the_bucket_and_combine_tasks_import_no_torch():
    """A Ray Data task runs in a fresh worker process, which imports the module of its function:
    the pool's bucket tasks and the combiner's tasks need numpy and pyarrow only, and torch would add
    about 2 s of CPU to every such process (the prototypes' embedding actor imports it when it starts)."""
    import subprocess
    import sys

    for module in ("muki_ray.data.pool", "muki_ray.stages.combiner"):
        out = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "False", (module, out.stdout, out.stderr[-2000:])
