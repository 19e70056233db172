"""What CI runs, what the package declares and what the README's "Compatibility" table tells users are one list.

The facts live in `.ci/run` (the Pythons of `make test`), `.ci/compat_matrix.py` (the Airflow lines and the
Python each runs on) and `pyproject.toml` (the classifiers); the README restates them for users, so this test
holds the README to them. The files are read from pytest's root (the clone), which `make test-compat` shares.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest) -> Path:
    return request.config.rootpath


@pytest.fixture(scope="module")
def compat_matrix(repo: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("compat_matrix", repo / ".ci" / "compat_matrix.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ci_pythons(repo: Path) -> list[str]:
    [line] = [line for line in (repo / ".ci" / "run").read_text().splitlines() if line.startswith("PYTHONS=")]
    return re.findall(r"\d+\.\d+", line)


def readme_ci_table(repo: Path) -> dict[str, dict[str, str]]:
    """The README's table of what CI runs: ``{suite: {python: cell}}``."""
    section = (repo / "README.md").read_text().split("## Compatibility", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    pythons = [re.sub(r"^Python ", "", cell) for cell in header[1:]]
    table = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table
        table[cells[0]] = dict(zip(pythons, cells[1:], strict=True))
    return table


def test_ci_tests_every_declared_python(repo: Path) -> None:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    classified = [
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: \d+\.\d+", c)
    ]

    assert ci_pythons(repo) == classified
    assert project["requires-python"] == f">={classified[0]}"


def test_the_readme_table_is_what_ci_runs(repo: Path, compat_matrix: ModuleType) -> None:
    table = readme_ci_table(repo)
    pythons = ci_pythons(repo)
    [make_test] = [cells for suite, cells in table.items() if "make test`" in suite]
    [compat] = [cells for suite, cells in table.items() if "make test-compat" in suite]

    assert list(make_test) == pythons
    assert all(cell for cell in make_test.values())
    compat_runs = {
        (version, python) for python, cell in compat.items() for version in re.findall(r"\d+\.\d+\.\d+", cell)
    }
    assert compat_runs == set(compat_matrix.MATRIX)
    assert {python for _, python in compat_matrix.MATRIX} == set(pythons)
