"""Names that do not exist and imports that are not used, found without running the code: much of hybridmoe runs
only on a GPU (CUDA streams, Triton launches), where the CPU test run cannot reach it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_undefined_names_or_unused_imports():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache",
                           "--output-format", "concise", "hybridmoe", "tui", "bench", "scripts", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
