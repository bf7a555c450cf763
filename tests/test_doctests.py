"""Docstring examples in every module run as tests, imported by their installed names."""

import doctest
import importlib
import pkgutil
import tomllib
from pathlib import Path

import pytest

PACKAGES = ["freshtower.core", "freshtower.streams", "freshtower.trainer", "freshtower.publisher", "freshtower.app"]


def _modules() -> list[str]:
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        names.extend(info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."))
    return sorted(names)


MODULES = _modules()


def test_every_package_of_the_namespace_is_covered():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["setuptools"]["packages"]
    assert {name for name in declared if name.count(".") == 1} == set(PACKAGES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
