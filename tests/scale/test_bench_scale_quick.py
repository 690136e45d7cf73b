"""The scale and SLQ-ghost benchmarks run end to end in quick mode (``-m slow``: the library code
they time is checked in test_lean_eigsh.py and tests/linalg/test_slq.py)."""

from __future__ import annotations

import json

import pytest
from benchmark_runs import run_benchmark


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "group"), [("bench_scale", "scale"), ("bench_slq_ghosts", "slq_ghosts")]
)
def test_quick_run_writes_results(tmp_path, module, group):
    run_benchmark(f"benchmarks.{module}", "--quick", "--out", str(tmp_path), timeout=900)
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
