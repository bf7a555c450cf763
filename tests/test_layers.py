"""The package layers, as pyproject.toml's import-linter contracts state them."""

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
    """`from freshtower.<pkg>.<module> import _name` across packages is a private reach."""
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if ".venv" in path.parts or path.parts[len(ROOT.parts)] in ("tests", "benchmarks", "build"):
            continue
        package = _package_of(path)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped.startswith("from freshtower."):
                continue
            module, _, names = stripped[len("from "):].partition(" import ")
            other = ".".join(module.split(".")[:2])
            if other == package:
                continue
            private = [n.strip() for n in names.strip("()").split(",") if n.strip().startswith("_")]
            if private:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {stripped}")
    assert not offenders, "\n".join(offenders)


def _package_of(path: Path) -> str:
    top = path.relative_to(ROOT).parts
    if top[0] == "freshtower":
        return f"freshtower.{top[1]}"
    return f"freshtower.{top[0]}"
