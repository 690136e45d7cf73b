"""The streamed-from-disk benchmark (benchmarks/bench_stream.py) on tiny sizes.

The default test runs one measurement in this process on a tiny ``.npy`` data set; the whole
script (``--quick``: every measurement in its own process, the report and the plot) runs under
``-m slow``.
"""

from __future__ import annotations

import gc
import json

import jax
import numpy as np
import pytest
from benchmark_runs import run_benchmark

import hvp


def test_one_product_measurement_on_a_tiny_npy_data_set(tmp_path):
    from benchmarks import bench_stream as B

    x_path, y_path = B.write_dataset(tmp_path, 600, 16, chunk=256)
    x, y = np.load(x_path), np.load(y_path)
    assert x.shape == (600, 16) and x.dtype == np.float32 and y.max() < B.CLASSES
    # arrays other tests in this worker process left alive are counted by jax.live_arrays()
    gc.collect()
    before = sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())
    r = B.measure_one(
        x_path=x_path, y_path=y_path, num_examples=500, what="product", batch=128, hidden=4
    )
    assert r["streaming"] and r["num_batches"] == 4 and r["passes"] == 2  # 3 x 128 + 116
    assert r["data_bytes"] == 500 * B.example_bytes(16)
    assert r["pass_s"] > 0 and r["peak_anon_bytes"] > 0
    # the parameters, two vectors and at most prefetch + 1 = 2 batches of 128 x 16 float32
    assert 0 < r["peak_live_array_bytes"] < before + 1e6
    # the script streams the prefix of the file it wrote, through memory maps
    params, _, data = B._setup(x_path, y_path, 500, 128, 4)
    assert isinstance(data, hvp.operators.ArrayBatches) and data.num_examples == 500
    assert (
        isinstance(data.arrays[0], np.memmap) and hvp.tree.size(params) == 16 * 4 + 4 + 4 * 10 + 10
    )


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
    run_benchmark("benchmarks.bench_stream", "--quick", "--out", str(tmp_path), timeout=900)
    data = json.loads((tmp_path / "stream.json").read_text())
    assert data["quick"] is True and (tmp_path / "stream.png").exists()
    assert all(r["status"] == "ok" and r["passes"] == 2 for r in data["products"])
    for r in data["algorithms"]:
        assert r["status"] == "ok" and r["eigsh"]["converged"]
        assert r["trace"]["num_matvecs"] == 12 and r["diagonal"]["num_matvecs"] == 8
    assert data["compare"]["status"] == "ok"
    assert max(data["compare"]["relative_difference"].values()) < 1e-4
