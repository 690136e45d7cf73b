"""Frobenius norm on the drivers (issue 11): compiled == host, resume bit for bit, chunk sizes,
jit / vmap, progress. Calibration against the dense truth is in test_trace.py (``frobenius``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hvp
from hvp.linalg import frobenius_norm
from hvp.linalg._frobenius import Frobenius
from tests.linalg.driver_checks import assert_drivers_agree, assert_resume_bitwise

LIKE = {"w": jnp.zeros((4, 5)), "b": jnp.zeros(20)}
N = 40
_RNG = np.random.default_rng(3)
A = _RNG.normal(size=(N, N))
A = A + A.T
OP = hvp.from_dense(A, like=LIKE)
KEY = jax.random.key(2)


def _call(**kw):
    # 30 probes in steps of 8: three full blocks and a remainder block of 6 (two phases)
    return frobenius_norm(OP, key=KEY, num_matvecs=30, chunk_size=8, **kw)


def test_drivers_agree_and_resume_bitwise(tmp_path):
    host, comp = assert_drivers_agree(_call, rtol=1e-12, atol=1e-14)
    assert host.num_matvecs == comp.num_matvecs == 30 and type(host.num_matvecs) is int
    assert host.method == "hutchinson" and host.samples.shape == (30,)
    assert_resume_bitwise(_call, tmp_path, interrupt_after=2)
    # exact path: 40 unit vectors in steps of 16, 16, 8
    exact = lambda **kw: frobenius_norm(OP, key=KEY, num_matvecs=N, chunk_size=16, **kw)  # noqa: E731
    ref, _ = assert_resume_bitwise(exact, tmp_path, interrupt_after=1)
    assert ref.method == "exact" and ref.num_matvecs == N
    np.testing.assert_allclose(float(ref.estimate), np.linalg.norm(A), rtol=1e-13)
    np.testing.assert_allclose(ref.samples, np.sum(A**2, axis=0), rtol=1e-13)
    assert float(ref.std_error) == 0.0


def test_chunk_size_jit_vmap_and_progress():
    ref = _call(driver="host")
    # the per-probe samples, hence the estimate, do not depend on the block size
    one_block = frobenius_norm(OP, key=KEY, num_matvecs=30, chunk_size=30)
    np.testing.assert_allclose(one_block.samples, ref.samples, rtol=1e-13)
    np.testing.assert_allclose(float(one_block.estimate), float(ref.estimate), rtol=1e-13)
    # the compiled driver inside the user's jit(vmap(...)) over keys
    keys = jnp.stack([KEY, jax.random.key(3)])
    batched = jax.jit(jax.vmap(lambda k: frobenius_norm(OP, key=k, num_matvecs=30, chunk_size=8)))(
        keys
    )
    assert batched.num_matvecs == 30 and batched.estimate.shape == (2,)
    np.testing.assert_allclose(batched.samples[0], ref.samples, rtol=1e-12)
    other = frobenius_norm(OP, key=keys[1], num_matvecs=30, chunk_size=8)
    np.testing.assert_allclose(float(batched.estimate[1]), float(other.estimate), rtol=1e-12)
    # progress: the running estimate and its relative standard error, total = the budget
    shown = _call(progress=True)
    np.testing.assert_array_equal(shown.samples, ref.samples)
    p = Frobenius(total=30, chunk=8).progress(
        {"matvecs": np.int32(30), "samples": np.asarray(ref.samples)}
    )
    assert p.matvecs == 30 and p.total == 30
    assert f"{float(ref.estimate):.6g}" in p.text
    assert f"{float(ref.squared_std_error) / (2 * float(ref.squared_estimate)):.2e}" in p.text
    with pytest.raises(ValueError, match="host driver"):
        _call(driver="compiled", checkpoint="unused.npz")  # refused before any product
