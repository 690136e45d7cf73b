"""Shared helper of the benchmark tests: run a benchmark script in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(*args: str, timeout: float, **env_extra: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository root; asserts exit status 0 and returns the run.

    The subprocess computes on the CPU in JAX's default precision (``JAX_PLATFORMS=cpu``,
    ``JAX_ENABLE_X64`` unset), draws plots with the ``Agg`` backend, imports ``benchmarks`` from
    this checkout, and gets ``env_extra`` on top (e.g. ``HVP_BENCH_HIDE_PEERS="all"``).
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", **env_extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
