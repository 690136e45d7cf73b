"""The LM scale benchmark's GPU profile (``python -m benchmarks --profile gpu``) on the CPU.

The default tests run the profile's sizing and budget logic with a fake device memory
(``HVP_BENCH_DEVICE_BYTES``) and a stand-in for the measurements (no model is compiled: the
library code the benchmark times is checked in tests/linalg and tests/scale/test_lean_eigsh.py),
and check that results are written after every measurement, so a run killed by a timeout keeps
what finished. The ``slow`` test runs the real quick profile end to end (tiny models, in-process).
"""

from __future__ import annotations

import json

import pytest
from benchmark_runs import run_benchmark

from benchmarks import bench_lm_scale as B
from benchmarks._arrays import lm_size


def test_lm_config_reaches_the_target_sizes():
    for target, d in ((1e7, 256), (5e7, 512), (1e8, 768), (1e9, 2048)):
        cfg = B.lm_config(target)
        n = cfg["n"]
        assert n == lm_size(**cfg)
        assert cfg["d_model"] == d and cfg["heads"] == d // 64
        # the fewest blocks that reach the target: one block fewer falls short
        assert (
            target <= n < target + lm_size(**dict(cfg, layers=1)) - lm_size(**dict(cfg, layers=0))
        )
    assert B.lm_config(1e8)["n"] >= 1e8


def test_sizes_scale_with_the_device_memory():
    kept, skipped = B.fit_sizes(B.GPU_LADDER, 80e9)  # an 80 GB H100: 48 bytes per parameter
    assert kept == [1e8, 3e8, 1e9] and [n for n, _ in skipped] == [2e9, 4e9]
    assert "more than 80% of the device's 80.0 GB" in skipped[0][1]
    kept, _ = B.fit_sizes(B.GPU_LADDER, 141e9)  # an H200 (48 bytes per parameter)
    assert kept == [1e8, 3e8, 1e9, 2e9]
    kept, skipped = B.fit_sizes(B.GPU_LADDER, 1e9)
    assert kept == [] and len(skipped) == 5


def test_projected_time_skips_what_would_pass_the_budget():
    assert B.project_seconds(1e9, 7, []) == 7 * B.PROCESS_OVERHEAD_S
    # 5 measurements took 100 s at 1e8: 20 s each; 7 of them at a 10x larger size: 1400 s
    assert B.project_seconds(1e9, 7, [(1e8, 100.0, 5)]) == pytest.approx(1400.0)
    # a smaller size is not projected cheaper (start-up and compilation do not shrink)
    assert B.project_seconds(1e7, 3, [(1e8, 100.0, 5)]) == pytest.approx(60.0)


def _fake_measure(calls):
    def measure(self, target, kwargs, *, timeout, mem_limit=None):
        calls.append((target, kwargs, timeout))
        # every earlier measurement is already on disk when the next one starts
        if len(calls) > 1:
            data = json.loads((self.report.out_dir / "lm_scale.json").read_text())
            assert len(data["lm"]) + len(data["mlp"]) >= 1
        n = kwargs.get("config", {}).get("n") or kwargs["n_target"]
        out = {
            "status": "ok",
            "n": n,
            "median_s": 1e-6 * n,
            "matvecs": 3,
            "peak_bytes": 8 * n,
            "peak_over_n": 2.0,
            "device_peak_bytes": 8 * n,
            "peak_extra_over_n": 2.0,
            "wall_s": 0.01,
        }
        if kwargs.get("what", "").startswith("eigsh"):
            out.update(eigenvalue=3.0, converged=True)
        return out

    return measure


def test_gpu_profile_sizes_to_a_fake_device_and_writes_partial_results(tmp_path, monkeypatch):
    calls, plots = [], []
    monkeypatch.setattr(B._Suite, "measure", _fake_measure(calls))
    monkeypatch.setattr(B._Suite, "_plot", lambda self: plots.append(len(self.rows)))
    # 20 MB of "device": 80% at 48 bytes per parameter fit 333,000 parameters: the 2e4 and 6e4
    # LMs and the 1e3 and 1e4 MLPs; the 1e6 LM is skipped for memory, and so is the full-basis
    # eigsh of the 6e4 LM (110 float32 vectors of n = 68,000: 30 MB)
    monkeypatch.setenv("HVP_BENCH_DEVICE_BYTES", "2e7")
    rep = B.run_profile(tmp_path, quick=True, time_budget=600.0)
    data = json.loads((tmp_path / "lm_scale.json").read_text())
    assert data["profile"] == "gpu" and data["dtype"] == "bfloat16"
    assert data["device_bytes_limit"] == 2e7
    assert data["device_bytes_source"] == "HVP_BENCH_DEVICE_BYTES"
    # the largest size that fits first
    assert [r["n"] for r in data["lm"]] == [68000, B.lm_config(2e4, **B.QUICK_SHAPE)["n"]]
    assert all(data["lm"][1][w]["status"] == "ok" for w in B.WHATS)
    assert data["lm"][0]["eigsh_full"]["status"] == "skipped"
    assert all(data["lm"][0][w]["status"] == "ok" for w in B.WHATS if w != "eigsh_full")
    assert [r["n_target"] for r in data["mlp"]] == [1e4, 1e3]
    assert [(s["model"], s["n"], s.get("what")) for s in data["skipped"]] == [
        ("lm", 1e6, None),
        ("lm", 68000, "eigsh_full"),
    ]
    # every LM measurement in bfloat16; the MLP through bench_scale's measurement
    lm_calls = [c for c in calls if c[0].endswith("bench_lm_scale:measure_one")]
    assert len(lm_calls) == 2 * len(B.WHATS) - 1
    assert all(c[1]["dtype"] == "bfloat16" for c in calls)
    assert sum(c[0] == "benchmarks.bench_scale:measure_one" for c in calls) == 4
    assert all(c[2] <= 600.0 for c in calls)  # no measurement may outlive the budget
    assert plots == [1, 2, 2]  # after each LM size and at the end
    md = rep.markdown()
    assert "## Skipped" in md and "more than 80% of the device's 0.0 GB" in md


def test_gpu_profile_skips_a_size_projected_over_the_time_budget(tmp_path, monkeypatch):
    clock = [0.0]
    calls = []
    fake = _fake_measure(calls)

    def measure(self, target, kwargs, **kw):
        clock[0] += 10.0  # every measurement takes 10 s of (fake) wall time
        return fake(self, target, kwargs, **kw)

    monkeypatch.setattr(B._Suite, "measure", measure)
    monkeypatch.setattr(B._Suite, "_plot", lambda self: None)
    monkeypatch.setattr(B, "_clock", lambda: clock[0])
    monkeypatch.setenv("HVP_BENCH_DEVICE_BYTES", "1e9")
    # 100 s budget, 70 s for the LM: the largest LM (1e6, 7 measurements) takes 70 s; the
    # smaller ones are projected at 7 x 10 s each, over the 0 s left. The MLP: the 1e4 one runs
    # (nothing measured yet, 30 s left), the 1e3 one is projected at 2 x 10 s, over the 10 s left
    B.run_profile(tmp_path, quick=True, time_budget=100.0)
    data = json.loads((tmp_path / "lm_scale.json").read_text())
    assert [r["n"] for r in data["lm"]] == [B.lm_config(1e6, **B.QUICK_SHAPE)["n"]]
    lm_reasons = [s["reason"] for s in data["skipped"] if s["model"] == "lm"]
    assert len(lm_reasons) == 2 and all(r.startswith("projected 70 s") for r in lm_reasons)
    assert [r["n_target"] for r in data["mlp"]] == [1e4]
    assert [s["n"] for s in data["skipped"] if s["model"] == "mlp"] == [1e3]
    assert data["wall_s"] == 90.0


def test_plot_is_written_atomically(tmp_path):
    suite = B._Suite(tmp_path, quick=True, profile="cpu", dtype="float32", isolate=False)
    ok = {"status": "ok", "median_s": 0.5, "peak_bytes": 4e8, "peak_over_n": 1.0, "matvecs": 1}
    suite.rows.append({"n": 10**8, "config": {"d_model": 768, "layers": 13}, "product": ok})
    suite.write(plot=True)
    assert (tmp_path / "lm_scale.png").stat().st_size > 0
    assert not list(tmp_path.glob(".lm_scale-*"))  # the temporary file was renamed
    data = json.loads((tmp_path / "lm_scale.json").read_text())
    assert data["figures"] == ["lm_scale.png"] and isinstance(data["uptime_start"], str)
    assert "![lm_scale.png](lm_scale.png)" in (tmp_path / "lm_scale.md").read_text()


def test_render_rewrites_the_markdown_from_the_json(tmp_path, monkeypatch):
    monkeypatch.setattr(B._Suite, "_plot", lambda self: None)
    suite = B._Suite(tmp_path, quick=True, profile="gpu", dtype="bfloat16", isolate=False)
    ok = {"status": "ok", "median_s": 0.5, "peak_bytes": 4e8, "peak_over_n": 1.0, "matvecs": 7}
    eig = dict(ok, eigenvalue=12.25, residual=0.5, converged=False)
    suite.rows.append(
        {"n": 10**8, "config": {"d_model": 768, "layers": 13}, "product": ok, "eigsh_lean": eig}
    )
    suite.write()
    md = (tmp_path / "lm_scale.md").read_text()
    (tmp_path / "lm_scale.md").unlink()
    B.render(tmp_path)
    assert (tmp_path / "lm_scale.md").read_text() == md
    assert "| 100.0M | 768 x 13 | - | 12.25 | False (0.5) |" in md


def test_cli_profile_flag_is_parsed():
    from benchmarks.__main__ import _parse

    args = _parse(["--profile", "gpu", "--quick", "--time-budget", "60"])
    assert args.profile == "gpu" and args.quick and args.time_budget == 60
    assert _parse([]).profile is None
    from benchmarks.__main__ import _groups

    assert "lm_scale" not in _groups(None)  # opt-in: an hour of CPU
    assert _groups(["lm"]) == _groups(["10"]) == ["lm_scale"]


@pytest.mark.slow
def test_quick_gpu_profile_end_to_end_on_cpu(tmp_path):
    run_benchmark(
        "benchmarks",
        "--profile",
        "gpu",
        "--quick",
        "--time-budget",
        "3000",  # tiny models, compile-bound: minutes on 2 shared cores
        "--out",
        str(tmp_path),
        timeout=900,
        HVP_BENCH_DEVICE_BYTES="2e7",
    )
    data = json.loads((tmp_path / "lm_scale.json").read_text())
    assert data["quick"] is True and data["dtype"] == "bfloat16"
    for row in data["lm"]:
        for what in B.WHATS:
            # a full mode over the (fake, 20 MB) device budget is skipped by the memory rule
            over = what.endswith("_full") and B.full_memory_bytes(what, row["n"]) > 0.8 * 2e7
            assert row[what]["status"] == ("skipped" if over else "ok"), row[what]
    row = data["lm"][-1]  # the smallest: both eigsh modes ran
    full, lean = row["eigsh_full"]["eigenvalue"], row["eigsh_lean"]["eigenvalue"]
    assert abs(full - lean) <= 2e-2 * abs(full)  # bfloat16 products
    assert all(r["product"]["status"] == "ok" for r in data["mlp"])
