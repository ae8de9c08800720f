"""Run a snippet of test code with Triton's interpreter (TRITON_INTERPRET=1: kernels execute on CPU tensors)
in a fresh process: the flag must be set before triton is imported, and the rest of the suite compiles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str, timeout: int = 600) -> str:
    """Run `code` under the interpreter from the repo root; fails the test on a non-zero exit. Returns stdout."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
