"""``hvp analyze`` on two processes (``jax.distributed``, gloo, 2 virtual CPU devices each) gives
the report of a one-process run.

The two processes run the documented launch command (docs/scaling.md): the same ``hvp analyze``
command line with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set.
Each reads the checkpoint and keeps its own half of every batch; process 0 alone prints the
summary and writes ``--out`` (both are given the same directory: process 1 must write nothing).
The reference is the same command without those variables. The model and data are tiny
(``multihost_analyze_model.py``: 43 parameters, 32 examples in 2 batches) and the flags minimal,
so the three processes spend their time starting JAX and compiling.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.scale.test_multihost import _close, _free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODEL = os.path.join(HERE, "multihost_analyze_model.py") + ":tiny_mlp"
FLAGS = [
    "--batch-size",
    "16",
    "-k",
    "1",
    "--probes",
    "2",
    "--iters",
    "4",
    "--trace-method",
    "hutchinson",
    "--trace-matvecs",
    "4",
    "--layer-matvecs",
    "2",
    "--no-plots",
    "--json",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    sys.path.insert(0, HERE)
    try:
        import multihost_analyze_model as m
    finally:
        sys.path.remove(HERE)
    d = tmp_path_factory.mktemp("mh_analyze")
    m.save(d / "ckpt")
    m.save_data(d / "data.npz")
    return d


def _env(**launch):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HVP_CACHE_DIR="off")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update({k: str(v) for k, v in launch.items()})
    return env


def _start(inputs, out, extra, log=None, **launch):
    """The command; its stderr in the file ``log`` (read while it runs) or a pipe."""
    cmd = [sys.executable, "-m", "hvp", "analyze", str(inputs / "ckpt"), "--model", MODEL]
    cmd += ["--data", str(inputs / "data.npz"), *FLAGS, *extra, "--out", str(out)]
    with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as err:
        proc = subprocess.Popen(
            cmd,
            env=_env(**launch),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # a signal sent to the test's group does not reach them
        )
    proc.log = log
    return proc


def _launch(inputs, out, extra=(), *, reference=None, logs=(None, None)):
    """The two processes of the launch command (and, with ``reference``, the one-process run)."""
    port = _free_port()
    launch = dict(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2, JAX_DISTRIBUTED_TIMEOUT=60
    )
    procs = [_start(inputs, out, extra, logs[i], JAX_PROCESS_ID=i, **launch) for i in range(2)]
    if reference is not None:
        procs.append(_start(inputs, reference, extra))
    return procs


def _finish(procs, timeout=300):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:  # a hung collective must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    return [
        (p.returncode, o, e if p.log is None else open(p.log).read())
        for p, (o, e) in zip(procs, outs, strict=True)
    ]


def _check_reports(multi: dict, single: dict, rtol: float) -> None:
    assert multi["device"]["process_count"] == 2 and multi["device"]["count"] == 4
    assert single["device"]["process_count"] == 1
    assert multi["num_matvecs"] == single["num_matvecs"]
    for name in ("top", "bottom"):
        m, s = multi[name], single[name]
        assert all(m["converged"]) and m["converged"] == s["converged"]
        assert m["num_matvecs"] == s["num_matvecs"]
        _close(m["eigenvalues"], s["eigenvalues"], rtol, f"{name} eigenvalues")
    for section, key in [
        ("trace", "estimate"),
        ("trace", "std_error"),
        ("density", "nodes"),
        ("density", "weights"),
        ("density", "negative_mass"),
        ("layers", "trace"),
        ("layers", "trace_std_error"),
        ("layers", "eigenvector_mass"),
        ("critical", "gradient_norm"),
        ("derived", "lambda_max"),
        ("derived", "lambda_min"),
    ]:
        _close(multi[section][key], single[section][key], rtol, f"{section}.{key}")


def _run_and_compare(inputs, tmp_path, extra, rtol):
    out, ref = tmp_path / "multi", tmp_path / "single"
    (r0, o0, e0), (r1, o1, e1), (rs, os_, es) = _finish(_launch(inputs, out, extra, reference=ref))
    assert rs == 0, es[-4000:]
    assert r0 == 0 and r1 == 0, (e0[-4000:], e1[-4000:])
    # process 0 prints the summary and writes --out; process 1 prints and writes nothing
    summary = json.loads(o0)
    assert summary["files"] == [str(out / "report.json")]
    assert o1 == "", o1
    assert sorted(os.listdir(out)) == ["report.json"]
    multi = json.loads((out / "report.json").read_text())
    single = json.loads((ref / "report.json").read_text())
    _check_reports(multi, single, rtol)
    return multi, single


# slow: three processes compiling the analysis (~22 s wall, ~53 s CPU) push the default suite
# past its 10-minute budget; the default run keeps the launch-setting checks below and the
# two-process algorithm test (tests/scale/test_multihost.py).
@pytest.mark.slow
def test_analyze_two_processes_match_one_float64(inputs, tmp_path):
    multi, single = _run_and_compare(inputs, tmp_path, ["--x64"], 1e-10)
    assert multi["model"]["dtype"] == "float64"


@pytest.mark.slow
def test_analyze_two_processes_match_one_float32(inputs, tmp_path):
    multi, _ = _run_and_compare(inputs, tmp_path, ["--tol", "1e-4"], 1e-5)
    assert multi["model"]["dtype"] == "float32"


@pytest.mark.slow
def test_resume_refused_on_every_process(inputs, tmp_path):
    results = _finish(_launch(inputs, tmp_path / "out", ["--resume", str(tmp_path / "state")]))
    for rc, out, err in results:
        assert rc == 1 and out == "", (rc, out, err[-2000:])
        assert "--resume (resume_dir=) is not supported when several processes run" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


@pytest.mark.slow
def test_one_process_failing_stops_both(inputs, tmp_path):
    """An --out that process 0 refuses (earlier outputs, no --overwrite): both exit 1 at once."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (r0, _, e0), (r1, _, e1) = _finish(_launch(inputs, out))
    assert r0 == 1 and "already holds report.json" in e0, e0[-2000:]
    assert r1 == 1 and "Process 0 of 2 failed while checking" in e1, e1[-2000:]
    assert (out / "report.json").read_text() == "{}"


@pytest.mark.slow
@pytest.mark.parametrize("to", ["both", "process 1"])
def test_ctrl_c(inputs, tmp_path, to):
    """SIGINT to both processes: 130 on both. To process 1 only: 130 there, and process 0 stops
    with status 1 and one line saying that another process stopped (not a hang)."""
    logs = [tmp_path / f"err{i}.txt" for i in range(2)]
    procs = _launch(inputs, tmp_path / "out", ["--x64"], logs=logs)
    deadline = time.monotonic() + 120
    # both past the start-up: gloo has connected them (its first collective)
    while not all("[Gloo]" in log.read_text() for log in logs):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1)
    for p in procs if to == "both" else procs[1:]:
        p.send_signal(signal.SIGINT)
    (r0, _, e0), (r1, _, e1) = _finish(procs, timeout=120)
    assert r1 == 130 and "hvp analyze: interrupted" in e1, (r1, e1[-2000:])
    if to == "both":
        assert r0 == 130 and "hvp analyze: interrupted" in e0, (r0, e0[-2000:])
    else:
        assert r0 == 1 and "Another process of the run stopped" in e0, (r0, e0[-2000:])
    assert not (tmp_path / "out" / "report.json").exists()


# --- the launch settings, in process (no runtime started) ----------------------------------------
def test_launch_settings_and_errors():
    from hvp.analysis import AnalysisError
    from hvp.analysis._distributed import initialize, launch_settings, wanted

    full = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"}
    assert launch_settings(full) == {
        "coordinator_address": "h:1",
        "num_processes": 3,
        "process_id": 2,
    }
    assert launch_settings({}) == {} and not wanted(None, environ={})
    assert wanted(None, environ={"JAX_PROCESS_ID": "0"}) and not wanted(False, environ=full)
    bad = [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID are not"),
        ({**full, "JAX_COORDINATOR_ADDRESS": "h"}, "must be 'host:port'"),
        ({**full, "JAX_NUM_PROCESSES": "two"}, "must be integers"),
        ({**full, "JAX_PROCESS_ID": "3"}, "must be in 0..2"),
    ]
    for env, text in bad:
        with pytest.raises(AnalysisError, match=text.replace("(", r"\(").replace(".", r"\.")):
            launch_settings(env)
    # half-configured: refused before JAX is touched (here JAX already runs, as in the suite)
    with pytest.raises(AnalysisError, match="JAX_PROCESS_ID is set but"):
        initialize(None, environ={"JAX_PROCESS_ID": "0"})
    assert initialize(None, environ={}) is False
    np.testing.assert_equal(initialize(False, environ=full), False)
