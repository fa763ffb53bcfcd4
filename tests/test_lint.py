"""The code base stays lint-clean and type-checks: ruff and mypy (strict; see
pyproject.toml) run as part of the test suite."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=170)


@pytest.mark.timeout(180)
def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "rmqpool", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(180)
def test_mypy_is_clean() -> None:
    result = _run("mypy", "rmqpool", "tests")
    assert result.returncode == 0, result.stdout + result.stderr
