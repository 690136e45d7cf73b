"""Two JAX processes on this machine (2 virtual CPU devices each, gloo collectives) give the
single-process results of ``eigsh``, ``trace``, ``diagonal`` and ``spectral_density``.

Each process reads only its own half of every batch (``jax.make_array_from_process_local_data``)
and holds the parameters sharded over the global 4-device mesh; the algorithms run their host
driver in every process around the same compiled programs (``multihost_worker.py``). The
single-process reference runs the same script with one process and plain arrays.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(pid, nproc, port, out, dtype):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, WORKER, str(pid), str(nproc), str(port), str(out), dtype],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run_all(tmp_path, dtype):
    port = _free_port()
    multi, single = tmp_path / "multi.json", tmp_path / "single.json"
    procs = [_launch(i, 2, port, multi, dtype) for i in range(2)]
    procs.append(_launch(0, 1, 0, single, dtype))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:  # a hung collective must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    # progress (`progress=True` on the diagonal) is shown by process 0 only
    assert "diagonal" in logs[0] and "diagonal" not in logs[1], (logs[0][-2000:], logs[1][-2000:])
    return json.loads(multi.read_text()), json.loads(single.read_text())


def _close(a, b, rtol, what):
    a, b = np.asarray(a, float), np.asarray(b, float)
    scale = max(np.max(np.abs(b)), 1e-30)
    err = np.max(np.abs(a - b)) / scale
    assert err <= rtol, f"{what}: relative difference {err:.3g} > {rtol:g}"


def _check(multi, single, rtol):
    assert multi["process_count"] == 2 and multi["device_count"] == 4
    assert single["process_count"] == 1
    assert multi["checkpoint_refused"] and single["checkpoint_refused"]
    _close(multi["hv"], single["hv"], rtol, "H @ v")
    for which in ("both",):
        m, s = multi[f"eigsh_{which}"], single[f"eigsh_{which}"]
        assert all(m["converged"]) and m["converged"] == s["converged"]
        assert m["num_matvecs"] == s["num_matvecs"]
        _close(m["eigenvalues"], s["eigenvalues"], rtol, f"eigsh {which} eigenvalues")
        for i, (u, w) in enumerate(zip(m["eigenvectors"], s["eigenvectors"], strict=True)):
            u, w = np.asarray(u), np.asarray(w)
            sign = np.sign(u @ w)  # an eigenvector's sign is arbitrary
            _close(sign * u, w, 100 * rtol, f"eigsh {which} eigenvector {i}")
    for name in ("trace", "trace_hutchpp", "diagonal", "density_nodes", "density_weights"):
        _close(
            multi[name] if name != "trace" else multi[name]["estimate"],
            single[name] if name != "trace" else single[name]["estimate"],
            rtol,
            name,
        )


def test_two_processes_match_one_float64(tmp_path):
    multi, single = _run_all(tmp_path, "float64")
    _check(multi, single, 1e-10)


@pytest.mark.slow
def test_two_processes_match_one_float32(tmp_path):
    multi, single = _run_all(tmp_path, "float32")
    _check(multi, single, 1e-5)
