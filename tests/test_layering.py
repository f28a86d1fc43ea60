"""The import-linter contract in pyproject.toml: the layers point down, and a violation fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=src, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)


def test_the_layers_point_down():
    done = lint(ROOT / "src")
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_a_model_importing_the_training_loop_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "src" / "tinylm", tmp_path / "tinylm",
                    ignore=shutil.ignore_patterns("__pycache__", "corpora"))
    gpt = tmp_path / "tinylm" / "models" / "gpt.py"
    gpt.write_text(gpt.read_text() + "\nfrom tinylm.train import loop  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert "tinylm.models is not allowed to import tinylm.train" in done.stdout
