"""The lint rules in pyproject.toml ([tool.ruff]) hold for the whole repository."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("ruff")
    if found:
        return [found]
    pytest.fail("ruff is not installed: pip install -r requirements.txt", pytrace=False)


def test_ruff_is_clean():
    out = subprocess.run([*_ruff(), "check", "--output-format", "concise", "."], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
