"""`python -m benchmarks --quick` runs end to end and writes sane results (so the scripts never rot).

The peers are hidden (``HVP_BENCH_HIDE_PEERS=all``), as on CI where PyTorch is not
installed: the peers group must then skip them cleanly and still run hvp's side.
"""

from __future__ import annotations

import json
import math

import pytest
from benchmark_runs import run_benchmark

GROUPS = {
    "dense": "dense_vs_hvp",
    "modes": "hvp_modes",
    "estimators": "estimators",
    "peers": "peers",
}


# The default run covers these groups; `modes` (the operator product against the raw JAX
# product, block modes: about half of this test's time) runs with `-m slow`; the library code
# it times is checked against dense references in tests/operators/test_block_and_linearize.py.
DEFAULT_GROUPS = ("dense", "estimators", "peers")


def _quick(tmp_path_factory, groups):
    out = tmp_path_factory.mktemp("bench")
    proc = run_benchmark(
        # the analysis group (compile-bound, minutes) has its own test: test_bench_analysis.py
        "benchmarks",
        "--quick",
        "--only",
        ",".join(groups),
        "--out",
        str(out),
        timeout=600,
        HVP_BENCH_HIDE_PEERS="all",
    )
    return out, proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _quick(tmp_path_factory, DEFAULT_GROUPS)


def _load(out, group):
    path = out / f"{GROUPS[group]}.json"
    assert path.exists(), f"{path} missing"
    data = json.loads(path.read_text())
    md = (out / f"{GROUPS[group]}.md").read_text()
    assert md.startswith("# ") and "|---|" in md, "Markdown report without a table"
    assert data["quick"] is True and data["environment"]["device"] == "cpu"
    for fig in data["figures"]:
        assert (out / fig).stat().st_size > 1000, f"{fig} empty"
    return data, md


def test_index_lists_every_group(quick_run):
    out, stdout = quick_run
    index = json.loads((out / "index.json").read_text())
    assert set(index["groups"]) == set(DEFAULT_GROUPS)
    assert "|---|" in stdout  # the tables are printed


def test_dense_vs_hvp(quick_run):
    data, _ = _load(quick_run[0], "dense")
    row = data["rows"][0]
    assert row["hvp"]["status"] == "ok" and row["hvp"]["median_s"] > 0
    assert row["hvp"]["q25_s"] <= row["hvp"]["median_s"] <= row["hvp"]["q75_s"]
    assert row["eigsh"]["status"] == "ok" and len(row["eigsh"]["eigenvalues"]) == 5
    assert row["dense"]["status"] == "ok", row["dense"]
    # float32 Lanczos and float32 dense eigh agree on the top 5
    assert row["eig_max_rel_err"] < 1e-3
    assert data["summary"]["largest_n_dense"] == row["n"]
    assert row["hvp"]["peak_rss_bytes"] and row["hvp"]["peak_rss_bytes"] > 1e7


@pytest.mark.slow
def test_hvp_modes(tmp_path_factory):
    data, md = _load(_quick(tmp_path_factory, ("modes",))[0], "modes")
    assert len(data["models"]) == 3
    for m in data["models"]:
        assert max(m["agreement_rel_err"].values()) < 1e-4, m["agreement_rel_err"]
        for name, ratio in m["ratios"].items():
            assert math.isfinite(ratio) and ratio > 0, (name, ratio)
        assert m["ratios"]["gradient"] == pytest.approx(1.0)
        assert "hvp.hessian @ v" in m["ratios"]
        for b in m["batched"].values():
            assert b["max_rel_diff"] < 1e-4 and b["speedup"] > 0
    assert "target_met" in data["summary"]
    assert "Targets" in md


def test_estimators(quick_run):
    data, _ = _load(quick_run[0], "estimators")
    assert set(data["spectra"]) == {"flat", "power-law", "outliers"}
    for name, s in data["spectra"].items():
        for method, rows in s["trace"].items():
            for r in rows:
                assert 0 <= r["mean_rel_err"] < 1.0, (name, method, r)
                assert r["mean_rel_std_error"] > 0
        for r in s["slq"]["vs_iters"] + s["slq"]["vs_probes"]:
            assert 0 <= r["mean_w1_rel"] < 0.2, (name, r)
    # the decaying spectrum is where the sketching estimators win
    pl = data["spectra"]["power-law"]["trace"]
    assert pl["hutch++"][-1]["mean_rel_err"] < pl["hutchinson"][-1]["mean_rel_err"]


def test_peers_skip_cleanly_without_torch(quick_run):
    data, md = _load(quick_run[0], "peers")
    assert not any(p["installed"] for p in data["peers"].values())
    assert "Not installed, skipped" in md and "torch" in md
    row = data["rows"][0]
    assert "pyhessian" not in row and "eigenthings" not in row and "matfree" not in row
    ours = row["hvp"]
    assert ours["top1_eigsh"]["reached"], ours["top1_eigsh"]
    assert ours["top1_eigsh"]["error"] <= 1e-4
    assert ours["trace_hutchinson"]["error"] < 1.0
    assert 0 <= ours["density"]["w1_rel"] < 0.2
