"""The package is strictly typed: this runs ``mypy --strict`` on it, to keep it so."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent  # where pyproject.toml is
MYPY_TIMEOUT = 300  # seconds: a cold run (no .mypy_cache) on a slow machine


@pytest.mark.timeout(MYPY_TIMEOUT + 30)
def test_mypy_strict() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed: pip install -e '.[dev]'")
    assert (ROOT / "pyproject.toml").is_file(), ROOT
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "sigpoll"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=MYPY_TIMEOUT,
    )
    assert proc.returncode == 0, f"mypy --strict sigpoll failed:\n{proc.stdout}{proc.stderr}"
