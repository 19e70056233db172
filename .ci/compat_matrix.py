"""`make test-compat`: the unit and dag.test() suites on the newest patch of every supported Airflow line.

Every line runs on Python 3.11, the oldest supported; the newest line runs on 3.12 and 3.13 too (the Pythons
of Airflow's official images). For each of these runs it builds a fresh venv holding ``apache-airflow==X.Y.Z``
and the provider's built wheel (never an editable install), resolved as of the day after that Airflow release
(``uv --exclude-newer``), as Airflow's constraint files pin it, but for NEWEST_ON_EVERY_LINE. It copies the
tests and example DAGs to a folder outside the source tree, checks that the provider is imported from the venv,
and runs pytest there. Installs go through uv and its cache, so a rerun costs seconds. The summary names the
Airflow and Python of every failure; the exit code is non-zero if any run failed.

    python .ci/compat_matrix.py [--pythons 3.11,3.13] [VERSION ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".compat"
#: The newest patch of every Airflow 3 line, and the day after its release on PyPI: dependencies released later
#: are left out, as they are from that release's constraints file. Without this, 3.0.6 resolves to a FastAPI
#: and Cadwyn that its own execution API cannot run with. The README's compatibility table lists these lines.
AIRFLOW_RELEASES = {
    "3.0.6": "2025-08-30",
    "3.1.8": "2026-03-12",
    "3.2.2": "2026-05-30",
    "3.3.2": "2026-09-18",
}
#: Installed at its newest on every line, past the release-day cut: common-compat, the one provider the wheel
#: needs newer than some lines' release day; and the clients the tests hold the emulator and the connection
#: handling to, which users upgrade independently of Airflow (workload identity is new in the official provider's
#: 2.2.0).
NEWEST_ON_EVERY_LINE = ("apache-airflow-providers-common-compat", "apache-airflow-providers-openai", "openai")
#: What the suites read besides the installed wheel and its test extra (the README: its snippets are tested;
#: docs/connections.md: its defaults). Nothing from the source tree is importable.
COPIED = ("tests", "example_dags", "docs/recipes", "docs/connections.md", "README.md")
#: The oldest supported Python runs every line; the newest Airflow line runs on the newer Pythons as well.
OLDEST_PYTHON = "3.11"
NEWER_PYTHONS = ("3.12", "3.13")
MATRIX: list[tuple[str, str]] = [(version, OLDEST_PYTHON) for version in AIRFLOW_RELEASES] + [
    (list(AIRFLOW_RELEASES)[-1], python) for python in NEWER_PYTHONS
]


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    print("+", " ".join(str(part) for part in command), flush=True)
    return subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def build_wheel(uv: str) -> Path:
    dist = WORK / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    run([uv, "build", "--wheel", "--quiet", "--out-dir", str(dist), str(ROOT)])
    [wheel] = dist.glob("*.whl")
    return wheel


def find_python(version: str) -> str:
    """The interpreter of Python ``version``, found as ``.ci/run`` finds it (``.ci/find-python``)."""
    return run([str(ROOT / ".ci" / "find-python"), version], capture_output=True, text=True).stdout.strip()


def label(version: str, python: str) -> str:
    """How a run is named in folders and in the summary."""
    return f"Airflow {version} on Python {python}"


def prepare(uv: str, python: str, version: str, wheel: Path) -> Path:
    """A fresh venv of Python ``python`` (``X.Y``) with Airflow ``version`` and the wheel (with its test extra);
    return its interpreter."""
    venv = WORK / f"airflow-{version}-py{python}"
    shutil.rmtree(venv, ignore_errors=True)
    run([uv, "venv", "--quiet", "--python", find_python(python), str(venv)])
    interpreter = venv / "bin" / "python"
    today = datetime.date.today().isoformat()
    run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(interpreter),
            "--exclude-newer",
            AIRFLOW_RELEASES[version],
            *(f"--exclude-newer-package={package}={today}" for package in NEWEST_ON_EVERY_LINE),
            f"apache-airflow=={version}",
            f"{wheel}[test]",
        ]
    )
    return interpreter


def copy_tests(version: str, python: str) -> Path:
    """A copy of the suites outside the source tree, taken with the wheel, so that edits made while the
    matrix runs do not mix into it."""
    workdir = WORK / f"run-{version}-py{python}"
    shutil.rmtree(workdir, ignore_errors=True)
    for name in COPIED:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "system")
            )
        else:
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, workdir / name)
    return workdir


def test(interpreter: Path, version: str, workdir: Path, pytest_args: list[str]) -> int:
    """Run the suites from their copy; return pytest's exit code."""
    env = {**os.environ, "PATH": f"{interpreter.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [
            str(interpreter),
            "-c",
            "import airflow, airflow_provider_openai_batch as p; print(airflow.__version__, p.__file__)",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if where[0] != version or not where[1].startswith(str(interpreter.parents[1])):
        raise SystemExit(
            f"Airflow {version}: the venv imports Airflow {where[0]} and the provider from {where[1]}."
        )
    command = [str(interpreter), "-m", "pytest", "tests", "-p", "no:cacheprovider", "-q", *pytest_args]
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=workdir, env=env, check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "versions", nargs="*", default=list(AIRFLOW_RELEASES), help=f"of {list(AIRFLOW_RELEASES)}"
    )
    parser.add_argument(
        "--pythons",
        default=",".join(sorted({python for _, python in MATRIX})),
        help="comma-separated X.Y: only the matrix's runs on these Pythons",
    )
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-k hook -x'")
    args = parser.parse_args()
    if unknown := set(args.versions) - set(AIRFLOW_RELEASES):
        parser.error(f"not a tested Airflow version: {sorted(unknown)}")
    runs = [(v, py) for v, py in MATRIX if v in args.versions and py in args.pythons.split(",")]
    if not runs:
        parser.error("no run of the matrix matches those versions and Pythons")
    uv = shutil.which("uv", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if uv is None:
        raise SystemExit("uv is needed: run `make install` first.")
    wheel = build_wheel(uv)
    workdirs = {(version, python): copy_tests(version, python) for version, python in runs}
    results: dict[str, str] = {}
    for version, python in runs:
        name = label(version, python)
        print(f"\n===== {name} =====", flush=True)
        started = time.monotonic()
        try:
            interpreter = prepare(uv, python, version, wheel)
        except subprocess.CalledProcessError as error:
            results[name] = f"install failed ({error.returncode})"
            continue
        code = test(interpreter, version, workdirs[version, python], shlex.split(args.pytest_args))
        minutes = (time.monotonic() - started) / 60
        results[name] = "passed" if code == 0 else f"FAILED (pytest exit {code})"
        print(f"===== {name}: {results[name]} in {minutes:.1f} min =====", flush=True)
    print("\nCompatibility matrix:")
    for name, result in results.items():
        print(f"  {name}: {result}")
    failed = [name for name, result in results.items() if result != "passed"]
    if failed:
        print(f"FAILED on {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
