"""``hvp.eigsh(basis="host")``: the Lanczos basis in host memory, against ``basis="device"`` and
``numpy.linalg.eigh`` (indefinite, repeated, singular, float32), its driver rules, progress,
bit-for-bit resume, and (in a 2-device subprocess) that the basis never reaches the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import operator, reference, sym

import hvp
from hvp import tree as tu
from tests.linalg.driver_checks import assert_resume_bitwise

KEY = jax.random.key(0)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vectors(result):
    m = len(result.eigenvalues)
    return np.stack([np.asarray(tu.ravel(tu.index(result.eigenvectors, i))) for i in range(m)])


def _same(host, dev, A, *, rtol):
    """Same result type, converged flags and eigenvalues (to round-off) as the device basis,
    and true float64 residuals of the host result below its thresholds."""
    assert type(host) is hvp.EigshResult and host.which == dev.which
    assert isinstance(host.num_matvecs, int) and isinstance(host.num_restarts, int)
    np.testing.assert_array_equal(np.asarray(host.converged), np.asarray(dev.converged))
    assert bool(np.all(host.converged))
    scale = float(np.max(np.abs(np.linalg.eigvalsh(A))))
    np.testing.assert_allclose(host.eigenvalues, dev.eigenvalues, rtol=0, atol=rtol * scale)
    V = _vectors(host).astype(np.float64)
    lam = np.asarray(host.eigenvalues, np.float64)
    res = np.linalg.norm(V @ A - lam[:, None] * V, axis=1)
    assert np.all(res <= 1.5 * np.asarray(host.thresholds) + 10 * rtol * scale), res


def test_host_matches_device_and_dense_on_the_indefinite_quadratic(capsys):
    H = operator("quadratic", "hessian")
    A = reference("quadratic", "hessian")
    host = hvp.eigsh(H, 3, which="both", key=KEY, tol=1e-8, basis="host", progress=True)
    assert "hvp eigsh done" in capsys.readouterr().err  # progress works on the host steps
    dev = hvp.eigsh(H, 3, which="both", key=KEY, tol=1e-8)
    _same(host, dev, A, rtol=1e-12)
    lam = np.linalg.eigvalsh(A)
    np.testing.assert_allclose(host.eigenvalues, np.r_[lam[:3], lam[-3:]], atol=1e-10)
    # the same steps: restarts and confirmations happen at the same products
    assert (host.num_matvecs, host.num_restarts) == (dev.num_matvecs, dev.num_restarts)
    cos = np.abs(np.sum(_vectors(host) * _vectors(dev), axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-8)


# a triple zero (singular) at the bottom, a triple eigenvalue at the top; n = 12 as the quadratic
# (the same compiled steps): locking and confirmation must find every copy
SPECTRUM = [0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 2.8, 3.0, 3.0, 3.0]


def _dense_check(r, A, want, *, atol):
    assert type(r) is hvp.EigshResult and bool(np.all(r.converged))
    np.testing.assert_allclose(r.eigenvalues, want, atol=atol)
    V = _vectors(r).astype(np.float64)
    res = np.linalg.norm(V @ A - np.asarray(r.eigenvalues, np.float64)[:, None] * V, axis=1)
    assert np.all(res <= 1.5 * np.asarray(r.thresholds) + atol), res


def test_repeated_and_zero_eigenvalues_keep_their_multiplicities():
    A = sym(SPECTRUM)
    op = hvp.from_dense(jnp.asarray(A))
    host = hvp.eigsh(op, 3, which="both", key=KEY, tol=1e-10, basis="host")
    _dense_check(host, A, [0, 0, 0, 3, 3, 3], atol=1e-9)
    dev = hvp.eigsh(op, 3, which="both", key=KEY, tol=1e-10)
    _same(host, dev, A, rtol=1e-12)
    assert host.num_restarts > 0  # locking/confirmation rewrote the host basis
    # the 6 vectors are orthonormal: three independent copies at each end
    V = _vectors(host)
    np.testing.assert_allclose(V @ V.T, np.eye(6), atol=1e-9)
    # the zeros: converged within zero_tol * ||A|| (eigsh's default, about 1e-12 ||A||) of 0
    thr = np.asarray(host.thresholds)[:3]
    np.testing.assert_allclose(thr, hvp.linalg.zero_floor(np.float64) * 3.0, rtol=1e-6)
    assert np.all(np.abs(np.asarray(host.eigenvalues)[:3]) <= 1e-12 * 3.0)


def test_float32():
    """float32 with a double zero at the top of a negative semi-definite operator: converged,
    within zero_tol * ||A|| (about 1e-5 ||A||) of 0 (the indefinite quadratic in float32: the
    slow test below)."""
    N = sym(-np.r_[np.zeros(2), np.linspace(1.0, 4.0, 10)]).astype(np.float32)
    host = hvp.eigsh(hvp.from_dense(jnp.asarray(N)), 2, key=KEY, basis="host")
    assert host.eigenvalues.dtype == jnp.float32
    assert host.dtype_policy.to_dict() == {"compute": "float32", "accumulate": "float32"}
    _dense_check(host, N, [0.0, 0.0], atol=1e-5 * 4.0)
    np.testing.assert_allclose(host.thresholds, hvp.linalg.zero_floor(np.float32) * 4.0, rtol=1e-3)


@pytest.mark.slow
def test_host_matches_device_in_float32_and_with_a_bfloat16_basis():
    H = operator("quadratic", "hessian", "float32")
    A32 = reference("quadratic", "hessian", "float32")
    host = hvp.eigsh(H, 2, key=KEY, basis="host")
    dev = hvp.eigsh(H, 2, key=KEY)
    _same(host, dev, A32, rtol=1e-5)
    low = hvp.eigsh(H, 2, key=KEY, basis="host", basis_dtype=jnp.bfloat16, tol=1e-2)
    ref = hvp.eigsh(H, 2, key=KEY, basis_dtype=jnp.bfloat16, tol=1e-2)
    np.testing.assert_allclose(low.eigenvalues, dev.eigenvalues, rtol=2e-2)
    np.testing.assert_allclose(low.eigenvalues, ref.eigenvalues, rtol=1e-3)


def test_driver_rules():
    op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))
    with pytest.raises(ValueError, match="basis='device'.*basis='none'"):
        hvp.eigsh(op, 1, key=KEY, basis="host", driver="compiled")
    with pytest.raises(ValueError, match="inside jax.jit"):
        jax.jit(lambda a: hvp.eigsh(hvp.from_dense(a), 1, key=KEY, basis="host").eigenvalues)(
            jnp.eye(4)
        )
    with pytest.raises(ValueError, match="'host' keeps it in host memory"):
        hvp.eigsh(op, 1, key=KEY, basis="cpu")


def test_checkpoint_saves_the_host_basis_and_resumes_bitwise(tmp_path, monkeypatch):
    op = hvp.from_dense(jnp.asarray(sym(SPECTRUM)))
    from hvp.linalg import _driver
    from hvp.linalg._host_basis import host_device

    saved = []
    orig = _driver._save
    monkeypatch.setattr(
        _driver,
        "_save",
        lambda path, state, *a: (
            saved.append((state["V"].shape, state["V"].devices())),
            orig(path, state, *a),
        ),
    )
    assert_resume_bitwise(
        lambda **kw: hvp.eigsh(op, 3, which="both", key=KEY, tol=1e-10, basis="host", **kw),
        tmp_path,
        interrupt_after=15,
        every=4,
    )
    # the file holds the basis (13 rows of n = 12), kept on the host's CPU device
    assert saved and all(x == ((13, 12), {host_device()}) for x in saved)


_TWO_DEVICES = textwrap.dedent(
    """
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import hvp
    from hvp.linalg import _driver
    from hvp.linalg._host_basis import host_device

    host, dev = jax.devices()  # cpu:0 plays the host, cpu:1 the accelerator (the default)
    jax.config.update("jax_default_device", dev)
    assert host_device() == host
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    A = (q * np.r_[5.0, 5.0, 4.0, np.linspace(-1, 3, 37)]) @ q.T
    A = (A + A.T) / 2
    Ad = jax.device_put(A, dev)
    like = jax.device_put(jnp.zeros(40), dev)
    rows = {}  # basis-sized arrays seen on each device while products run
    orig = _driver.block_product

    def watch(op, vs, chunk_size=None):
        for x in jax.live_arrays():
            if x.shape == (13, 40):  # num_iters + 1 rows of n
                for d in x.devices():
                    rows[str(d)] = rows.get(str(d), 0) + 1
        return orig(op, vs, chunk_size)

    _driver.block_product = watch
    out = {}
    for basis in ("host", "device"):
        rows.clear()
        r = hvp.eigsh(lambda v: Ad @ v, 3, key=jax.random.key(0), like=like, basis=basis,
                      num_iters=12, tol=1e-10)
        out[basis] = dict(lam=np.asarray(r.eigenvalues).tolist(), rows=dict(rows),
                          vec_device=str(list(r.eigenvectors.devices())[0]),
                          conv=bool(np.all(r.converged)), matvecs=r.num_matvecs)
    # a checkpoint of the host basis next to state on the other device, interrupted and resumed
    path = sys.argv[1]
    calls = {"n": 0}

    def flaky(op, vs, chunk_size=None):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return orig(op, vs, chunk_size)

    _driver.block_product = flaky
    run = lambda: hvp.eigsh(lambda v: Ad @ v, 3, key=jax.random.key(0), like=like,
                            basis="host", num_iters=12, tol=1e-10,
                            checkpoint=_driver.Checkpoint(path, every=2))
    try:
        run()
    except KeyboardInterrupt:
        out["saved"] = os.path.exists(path)
    _driver.block_product = orig
    out["resumed"] = np.asarray(run().eigenvalues).tolist()
    out["ref"] = np.linalg.eigvalsh(A)[-3:].tolist()
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_two_devices_the_basis_stays_on_the_host(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES, str(tmp_path / "state.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    host, dev = out["host"], out["device"]
    # the device basis (13 rows) lives on the accelerator; the host basis never does
    assert dev["rows"].get("cpu:1", 0) > 0 and dev["rows"].get("cpu:0", 0) == 0
    assert host["rows"].get("cpu:1", 0) == 0 and host["rows"].get("cpu:0", 0) > 0
    assert host["vec_device"] == dev["vec_device"] == "cpu:1"  # results where the model is
    assert host["conv"] and dev["conv"] and host["matvecs"] == dev["matvecs"]
    np.testing.assert_allclose(host["lam"], dev["lam"], atol=1e-11)
    np.testing.assert_allclose(host["lam"], out["ref"], atol=1e-9)
    assert out["saved"] and out["resumed"] == host["lam"]
