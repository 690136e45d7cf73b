"""The Hessian-free benchmark runs end to end in quick mode (slow: about 30 s of compilation).

The optimizer itself is checked against dense references in tests/optim/test_hessian_free.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_writes_sane_results(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_hessian_free as bench

    rep = bench.run(tmp_path, quick=True)
    rep.write()
    data = json.loads((tmp_path / "hessian_free.json").read_text())
    assert data["quick"] and set(data["tasks"]) == {"classifier", "autoencoder"}
    for task in data["tasks"].values():
        assert str(task["adam_best_lr"]) in task["adam"]
        for hist in task["hf"].values():
            assert len(hist) == task["hf_steps"] + 1
            assert hist[-1]["train_loss"] < hist[0]["train_loss"]
            assert all(r["num_matvecs"] >= 2 for r in hist[1:])
    assert (tmp_path / "hessian_free.png").stat().st_size > 10_000
    md = (tmp_path / "hessian_free.md").read_text()
    assert "autoencoder: Adam learning-rate grid" in md and "classifier: Hessian-free steps" in md
    assert not [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".")
    ]  # no temporary files left
