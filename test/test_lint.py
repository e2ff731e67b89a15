"""The code base stays lint-clean (ruff, ruff.toml) and type-clean (mypy, mypy.ini)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", "unet_perception", "benchmarks", "launch", "test")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = run(sys.executable, "-m", "mypy", "unet_perception", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
