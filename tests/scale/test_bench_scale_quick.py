"""The scale and SLQ-ghost benchmarks run end to end in quick mode (``-m slow``: the library code
they time is checked in test_lean_eigsh.py and tests/linalg/test_slq.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "group"), [("bench_scale", "scale"), ("bench_slq_ghosts", "slq_ghosts")]
)
def test_quick_run_writes_results(tmp_path, module, group):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / f"{group}.json").read_text())
    assert data["quick"] is True
    if group == "scale":
        for row in data["models"]:
            for what in ("product", "eigsh_device", "eigsh_none"):
                assert row[what]["status"] == "ok", row[what]
            assert row["eigsh_none"]["converged"] and row["eigsh_device"]["converged"]
            top_full = row["eigsh_device"]["eigenvalue"]
            assert abs(row["eigsh_none"]["eigenvalue"] - top_full) <= 1e-2 * abs(top_full)
    else:
        rows = data["rows"]
        assert rows[-1]["copies_top_plain"] >= rows[-1]["copies_top_reorth"] == 1.0
