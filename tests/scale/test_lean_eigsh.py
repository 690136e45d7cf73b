"""``hvp.eigsh(basis="none")``: the memory-lean Lanczos (no reorthogonalisation,
Cullum-Willoughby test, second pass for the eigenvectors) against ``numpy.linalg.eigh`` and the
full mode on the shared problems, repeated eigenvalues, drivers, resume and memory in units of n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import operator, reference

import hvp
from hvp import tree as tu
from tests.linalg.driver_checks import assert_drivers_agree, assert_resume_bitwise

KEY = jax.random.key(0)


def _distinct(values, tol):
    """Sorted distinct values (within ``tol``)."""
    out = []
    for x in np.sort(values):
        if not out or x - out[-1] > tol:
            out.append(x)
    return np.asarray(out)


def _vectors(result):
    m = len(result.eigenvalues)
    return np.stack([np.asarray(tu.ravel(tu.index(result.eigenvectors, i))) for i in range(m)])


def _check_against_dense(H, name, which, k, lean, *, dtype="float64", rtol=1e-10):
    A = reference(name, "hessian", dtype)
    lam_ref, vec_ref = np.linalg.eigh(A)
    n = len(lam_ref)
    idx = {
        "largest": np.arange(n - k, n),
        "smallest": np.arange(k),
        "both": np.r_[np.arange(k), np.arange(n - k, n)],
    }[which]
    assert isinstance(lean, hvp.linalg.LeanEigshResult) and lean.multiplicities == "distinct"
    assert bool(np.all(lean.converged)) and lean.num_restarts == 0
    assert isinstance(lean.num_matvecs, int) and lean.num_matvecs > 0
    scale = np.max(np.abs(lam_ref))
    np.testing.assert_allclose(lean.eigenvalues, lam_ref[idx], atol=rtol * scale)
    # true residuals, recomputed here in float64, below the reported thresholds
    V = _vectors(lean)
    res = np.linalg.norm(V @ A - np.asarray(lean.eigenvalues, np.float64)[:, None] * V, axis=1)
    assert np.all(res <= np.asarray(lean.thresholds) * 1.1 + 10 * rtol * scale), (res, lean)
    # eigenvectors: simple eigenvalues here, so equal to numpy's up to sign
    cos = np.abs(np.sum(V * vec_ref[:, idx].T, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e3 * rtol)


@pytest.mark.parametrize(
    ("name", "which", "k"),
    [
        ("mlp", "largest", 3),
        pytest.param("mlp", "both", 2, marks=pytest.mark.slow),
        pytest.param("cnn", "smallest", 2, marks=pytest.mark.slow),
    ],
)
def test_lean_matches_dense_float64(name, which, k):
    H = operator(name, "hessian")
    lean = hvp.eigsh(H, k, which=which, basis="none", key=KEY, tol=1e-8, num_iters=120)
    _check_against_dense(H, name, which, k, lean)


def test_lean_matches_full_and_dense_on_the_indefinite_quadratic():
    H = operator("quadratic", "hessian")
    lean = hvp.eigsh(H, 3, which="both", basis="none", key=KEY, tol=1e-8, num_iters=120)
    full = hvp.eigsh(H, 3, which="both", key=KEY, tol=1e-8)
    _check_against_dense(H, "quadratic", "both", 3, lean)
    np.testing.assert_allclose(lean.eigenvalues, full.eigenvalues, rtol=1e-10, atol=1e-12)
    cos = np.abs(np.sum(_vectors(lean) * _vectors(full), axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-8)


def test_lean_float32_against_float64_reference():
    H = operator("quadratic", "hessian", "float32")
    r = hvp.eigsh(H, 2, basis="none", key=KEY, tol=1e-6, num_iters=120)
    assert r.dtype_policy.compute == "float32"
    _check_against_dense(H, "quadratic", "largest", 2, r, dtype="float32", rtol=1e-5)


def test_repeated_eigenvalues_are_returned_once():
    # eigenvalues 5 (x3), 4 (x2), 1..., 0: the lean mode sees each distinct value once
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(14, 14)))
    lam = np.array([5.0, 5.0, 5.0, 4.0, 4.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0])
    A = (q * lam) @ q.T
    r = hvp.eigsh(hvp.from_dense(A), 3, basis="none", key=KEY, tol=1e-10, num_iters=60)
    np.testing.assert_allclose(r.eigenvalues, [3.0, 4.0, 5.0], atol=1e-10)
    assert bool(np.all(r.converged)) and r.multiplicities == "distinct"
    # fewer distinct eigenvalues than asked for: the missing pair is not converged, and said so
    B = np.diag([0.0, 0.0, 1.0, 1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="distinct"):
        r = hvp.eigsh(hvp.from_dense(B), 4, basis="none", key=KEY, num_iters=60)
    assert np.asarray(r.converged).tolist() == [False, True, True, True]
    np.testing.assert_allclose(np.asarray(r.eigenvalues)[1:], [0.0, 1.0, 2.0], atol=1e-12)
    # a null space in float32: the zero is converged under the test relative to ||A|| (zero_tol,
    # default hvp.linalg.zero_floor, as the full mode), and is within it of 0
    C = (q * np.r_[np.linspace(1.0, 4.0, 10), np.zeros(4)]) @ q.T
    r = hvp.eigsh(
        hvp.from_dense(jnp.asarray(C, jnp.float32)), 1, which="smallest", basis="none", key=KEY
    )
    thr = hvp.linalg.zero_floor(np.float32) * 4.0
    assert bool(r.converged[0]) and abs(float(r.eigenvalues[0])) <= thr * 1.001
    # ||A|| is estimated from below (the largest ||A v|| seen): the test is never looser
    assert 0.9 * thr <= float(r.thresholds[0]) <= thr * 1.001
    r = hvp.eigsh(hvp.from_dense(C), 1, which="smallest", basis="none", key=KEY, zero_tol=1e-3)
    assert 1e-3 <= float(r.thresholds[0]) <= 4e-3 * (1 + 1e-12)  # zero_tol * (||A|| est. <= 4)
    assert bool(r.converged[0]) and abs(float(r.eigenvalues[0])) <= float(r.thresholds[0])


def test_ghost_values_are_discarded_where_no_reorthogonalisation_duplicates():
    # Many steps on a small operator: without reorthogonalisation T_j holds ghost copies and
    # spurious values, yet the good Ritz values are the distinct eigenvalues.
    lam = np.array([10.0, 9.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    A = hvp.from_dense(np.diag(lam))
    r = hvp.eigsh(A, 4, basis="none", key=KEY, tol=1e-12, num_iters=60)
    np.testing.assert_allclose(r.eigenvalues, [0.9, 1.0, 9.0, 10.0], atol=1e-11)
    assert bool(np.all(r.converged))


def test_lean_drivers_agree_and_resume_bitwise(tmp_path):
    H = operator("quadratic", "hessian")

    def call(**kw):
        return hvp.eigsh(H, 2, which="both", basis="none", key=KEY, tol=1e-8, num_iters=60, **kw)

    host, _ = assert_drivers_agree(call)
    assert_resume_bitwise(call, tmp_path, interrupt_after=host.num_matvecs // 2)
    top = jax.jit(lambda: call(driver="auto").eigenvalues)()  # inside jit: the compiled driver
    np.testing.assert_allclose(top, host.eigenvalues, atol=1e-12)


def test_lean_bad_arguments():
    A = hvp.from_dense(np.eye(3))
    with pytest.raises(ValueError, match="basis"):
        hvp.eigsh(A, 1, basis="host-disk", key=KEY)
    with pytest.raises(ValueError, match="basis_dtype"):
        hvp.eigsh(A, 1, basis="none", basis_dtype=jnp.float32, key=KEY)


def _bytes_per_n(basis, m, k=2):
    """Bytes per parameter of the compiled eigsh (arguments, outputs and temporaries), from
    XLA's memory analysis at two sizes (the slope in n)."""
    sizes = []
    for n in (4000, 16000):
        like = jnp.zeros(n)

        def top(d, like=like):
            op = hvp.from_matvec(lambda v: d * v, like=like)
            return hvp.eigsh(
                op, k, basis=basis, num_iters=m, key=KEY, driver="compiled"
            ).eigenvalues

        ma = jax.jit(top).lower(jnp.linspace(0.0, 1.0, n)).compile().memory_analysis()
        sizes.append(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)
    return (sizes[1] - sizes[0]) / (16000 - 4000)


def test_lean_memory_is_constant_in_num_iters():
    """The lean mode's memory is O(1) vectors of n, whatever ``num_iters``."""
    # in vectors of n float64 numbers; XLA's buffer assignment varies by a few vectors
    lean_30, lean_120 = _bytes_per_n("none", 30) / 8, _bytes_per_n("none", 120) / 8
    for lean in (lean_30, lean_120):  # state (4 + 2k) plus a step's temporaries
        assert lean <= 4 + 2 * 2 + 10, (lean_30, lean_120)


@pytest.mark.slow
def test_full_basis_memory_grows_with_num_iters():
    """The contrast: the default mode's basis alone is ``(num_iters + 1) n``."""
    full_30 = _bytes_per_n("device", 30) / 8
    assert full_30 >= 31, full_30
