"""The package layers, as pyproject.toml's import-linter contracts state them."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "lint-imports is not installed (pip install -e '.[test]')"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # both contracts are checked, not skipped
    assert "2 kept, 0 broken" in result.stdout, result.stdout


def test_no_stage_reads_another_stages_private_names():
    """`from freshtower.<pkg>.<module> import _name`, from any other module
    (another stage's or a sibling's), is a private reach; so is importing a
    private module (`_name.py`) from outside its package."""
    offenders = _private_imports(_product_modules())
    assert not offenders, "\n".join(offenders)


def test_no_module_touches_another_modules_private_attributes():
    """`thing._name` (read or written) where `_name` belongs to another
    module of the project (a private attribute, function or class it
    defines) and not to this one. `self._name` and `cls._name` are a
    class's own."""
    offenders = _private_attribute_reaches(_product_modules())
    assert not offenders, "\n".join(offenders)


def test_the_private_name_checks_catch_each_form_of_reach():
    def module(relative: str, source: str) -> tuple[Path, str, ast.Module]:
        return ROOT / relative, _module_of(ROOT / relative), ast.parse(source)

    learner = module("trainer/learner.py", "class Learner:\n    def __init__(self):\n        self._cache = None\n")
    artifacts = module("trainer/artifacts.py", "def _to_arrays(state):\n    return state\n")
    online = module(
        "trainer/online.py",
        "from freshtower.trainer.artifacts import _to_arrays, load\n"
        "from freshtower.core.contracts._hidden import reader\n"
        "def fork(self, learner):\n    learner._cache = 1\n    self._own = 2\n    return self._own\n",
    )
    modules = [learner, artifacts, online]
    assert _private_imports(modules) == [
        "trainer/online.py:1: from freshtower.trainer.artifacts import _to_arrays",
        "trainer/online.py:2: imports the private module freshtower.core.contracts._hidden",
    ]
    assert _private_attribute_reaches(modules) == ["trainer/online.py:4: learner._cache"]


def _private_imports(modules: list[tuple[Path, str, ast.Module]]) -> list[str]:
    offenders = []
    for path, module, tree in modules:
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("freshtower."):
                continue
            source = node.module
            private = [a.name for a in node.names if a.name.startswith("_") and not _is_dunder(a.name)]
            if private and source != module:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {source} import {', '.join(private)}")
            parts = source.split(".")
            for depth, part in enumerate(parts):
                if part.startswith("_") and not _is_dunder(part) and not module.startswith(".".join(parts[:depth]) + "."):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports the private module {source}")
    return offenders


def _private_attribute_reaches(modules: list[tuple[Path, str, ast.Module]]) -> list[str]:
    owned = {path: _private_names_defined(tree) for path, _, tree in modules}
    offenders = []
    for path, _, tree in modules:
        elsewhere = set().union(*(names for other, names in owned.items() if other != path)) - owned[path]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in elsewhere:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return offenders


def _product_modules() -> list[tuple[Path, str, ast.Module]]:
    """(path, module name, syntax tree) of every module of the package."""
    found = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        top = path.relative_to(ROOT).parts[0]
        if ".venv" in path.parts or top in ("tests", "benchmarks", "build") or top.endswith(".egg-info"):
            continue
        found.append((path, _module_of(path), ast.parse(path.read_text(), str(path))))
    return found


def _private_names_defined(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, module-level
    names, and attributes it sets on ``self`` or ``cls``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not _is_dunder(n)}


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "freshtower":
        parts.insert(0, "freshtower")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)
