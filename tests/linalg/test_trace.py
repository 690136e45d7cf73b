"""Trace (Hutchinson, Hutch++, XTrace) and Frobenius-norm estimators.

Statistical rules (fixed keys, so every test is deterministic):

* Calibration over K = 50 keys: if ``(estimate - truth) / std_error`` were
  standard normal, the number of keys outside 2 standard errors would be
  Binomial(50, 0.0455) (mean 2.3; P(> 7) = 0.004): we require at most 7, and
  every key within 4 standard errors (P(|Z| > 4) = 6e-5 per key).
* Spread: the standard deviation of the estimates over keys divided by the
  root-mean-square standard error is 1 for calibrated errors; with 50 keys the
  sampling error of that ratio is about 10 %, so the band [0.7, 1.4] is about
  3-4 sigma wide. XTrace's default (jackknife) standard error is conservative
  by design (Efron-Stein; measured ratio 0.3-0.9): its band is [0.25, 1.3].
  The paper's own estimate (``error_estimate="sample"``) is optimistic on
  decaying spectra (measured ratio 1.2-1.4).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hvp
from hvp import tree as tu
from hvp.linalg import TraceResult, _driver, frobenius_norm, trace
from hvp.linalg import _trace as T
from hvp.linalg._probes import probes
from tests.linalg.driver_checks import assert_drivers_agree, assert_resume_bitwise

N = 300
K = 50
METHODS = ("hutchinson", "hutch++", "xtrace")


def _orth(n, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q


_Q = _orth(N, 0)
_RNG = np.random.default_rng(1)
SPECTRA = {
    "flat": _RNG.uniform(1.0, 2.0, N),
    "decaying": 1.0 / np.arange(1, N + 1) ** 2,
    "indefinite": _RNG.normal(size=N),
}


def _matrix(lam, q=_Q):
    return (q * lam) @ q.T


OPS = {name: hvp.from_dense(_matrix(lam)) for name, lam in SPECTRA.items()}


def _runs(op, method, m, keys=range(K), **kw):
    res = [trace(op, key=jax.random.key(k), num_matvecs=m, method=method, **kw) for k in keys]
    est = np.array([float(r.estimate) for r in res])
    se = np.array([float(r.std_error) for r in res])
    return est, se


def _check_calibrated(est, se, truth, *, band=(0.7, 1.4)):
    z = (est - truth) / se
    assert np.all(np.abs(z) <= 4.0), f"an estimate is {np.max(np.abs(z)):.2f} standard errors off"
    assert np.sum(np.abs(z) > 2.0) <= 7, (
        f"{np.sum(np.abs(z) > 2.0)} of {len(z)} keys outside 2 standard errors"
    )
    ratio = np.std(est - truth) / np.sqrt(np.mean(se**2))
    assert band[0] <= ratio <= band[1], f"empirical spread / standard error = {ratio:.2f}"
    return ratio


# ------------------------------------------------------------------------------------------------
# calibration against dense truth
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("method", METHODS)
def test_trace_calibrated_over_keys(method, spectrum):
    truth = float(np.sum(SPECTRA[spectrum]))
    est, se = _runs(OPS[spectrum], method, 60)
    _check_calibrated(est, se, truth, band=(0.25, 1.3) if method == "xtrace" else (0.7, 1.4))


def test_xtrace_sample_error_estimate_is_the_papers():
    truth = float(np.sum(SPECTRA["decaying"]))
    est, se = _runs(OPS["decaying"], "xtrace", 60, keys=range(30), error_estimate="sample")
    est_j, se_j = _runs(OPS["decaying"], "xtrace", 60, keys=range(30))
    np.testing.assert_array_equal(est, est_j)  # same estimate, different error bar
    ratio = np.std(est - truth) / np.sqrt(np.mean(se**2))
    assert 0.9 <= ratio <= 2.0  # optimistic: the t_i are positively correlated
    assert np.mean(se_j > se) > 0.8


def test_hutchpp_and_xtrace_beat_hutchinson_on_decaying_spectrum():
    truth = float(np.sum(SPECTRA["decaying"]))
    mae = {
        m: np.mean(np.abs(_runs(OPS["decaying"], m, 60, keys=range(30))[0] - truth))
        for m in METHODS
    }
    # measured: hutchinson 0.10, hutch++ 0.002, xtrace 0.0014 (error ~ 1/m instead of 1/sqrt(m))
    assert mae["hutch++"] < 0.1 * mae["hutchinson"]
    assert mae["xtrace"] < 0.1 * mae["hutchinson"]


def test_hutchinson_error_falls_like_inverse_sqrt_matvecs():
    truth = float(np.sum(SPECTRA["flat"]))
    budgets = np.array([4, 16, 64, 256])
    rmse = [
        np.sqrt(np.mean((_runs(OPS["flat"], "hutchinson", int(m), keys=range(40))[0] - truth) ** 2))
        for m in budgets
    ]
    slope = np.polyfit(np.log(budgets), np.log(rmse), 1)[0]
    assert -0.65 <= slope <= -0.35, slope


def test_hutchinson_variance_matches_theory():
    # Var(z^T A z) = 2 sum_{i != j} A_ij^2 for Rademacher z.
    a = _matrix(SPECTRA["indefinite"])
    theory = 2.0 * (np.sum(a**2) - np.sum(np.diag(a) ** 2))
    res = trace(OPS["indefinite"], key=jax.random.key(0), num_matvecs=299)
    var = float(np.var(np.asarray(res.samples), ddof=1))
    # the sample variance of 299 samples has relative s.e. ~ sqrt(2/298) ~ 8 % (near-normal samples)
    assert abs(var / theory - 1.0) < 0.32


# ------------------------------------------------------------------------------------------------
# exactness of the efficient formulas against brute force
# ------------------------------------------------------------------------------------------------
def test_xtrace_matches_brute_force_leave_one_out():
    n, m = 120, 9
    a = _matrix(0.8 ** np.arange(n), _orth(n, 3))
    op = hvp.from_dense(a)
    omega = jax.random.normal(jax.random.key(3), (m, n))

    def xt(o, w, jk):
        return T._xtrace_round(o, w, shift=0.0, jackknife=jk)

    _, se_j, samples, _ = xt(op, omega, True)
    o = np.asarray(omega)
    y = a @ o.T
    ref = []
    for i in range(m):
        q, _ = np.linalg.qr(np.delete(y, i, axis=1))
        u = o[i] - q @ (q.T @ o[i])
        ref.append(np.trace(q.T @ a @ q) + (n - (m - 1)) / (u @ u) * (u @ a @ u))
    np.testing.assert_allclose(np.asarray(samples), ref, rtol=1e-9, atol=1e-12)
    theta = [float(xt(op, jnp.delete(omega, j, axis=0), False)[0]) for j in range(m)]
    theta = np.array(theta)
    np.testing.assert_allclose(
        float(se_j), math.sqrt((m - 1) / m * np.sum((theta - theta.mean()) ** 2)), rtol=1e-8
    )


def test_hutchpp_matches_brute_force():
    n, k, r = 100, 6, 8
    a = _matrix(np.random.default_rng(5).normal(size=n), _orth(n, 4))
    op = hvp.from_dense(a)
    key = jax.random.key(1)
    res = trace(op, key=key, num_matvecs=2 * k + r, method="hutch++")
    assert res.num_matvecs == 20 and 20 // 3 == k  # k = m // 3 sketch probes, r = m - 2k residual
    est, se, samples = res.estimate, res.std_error, res.samples
    key_s, key_g = jax.random.split(key)
    sketch = probes(key_s, op.like, k, "rademacher")
    q, _ = np.linalg.qr(a @ np.asarray(sketch).T)
    p = np.eye(n) - q @ q.T
    g = np.asarray(probes(key_g, op.like, r, "rademacher"))
    resid = np.array([gi @ p @ a @ p @ gi for gi in g])
    np.testing.assert_allclose(np.asarray(samples), np.trace(q.T @ a @ q) + resid, rtol=1e-9)
    np.testing.assert_allclose(float(se), np.std(resid, ddof=1) / math.sqrt(r), rtol=1e-9)
    np.testing.assert_allclose(float(est), np.trace(q.T @ a @ q) + resid.mean(), rtol=1e-9)


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_low_rank_is_exact(method):
    q = _orth(N, 6)[:, :5]
    a = (q * np.arange(1.0, 6.0)) @ q.T
    res = trace(hvp.from_dense(a), key=jax.random.key(0), num_matvecs=30, method=method)
    assert abs(float(res.estimate) - 15.0) < 1e-8
    assert float(res.std_error) < 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_budget_at_least_n_is_exact(method):
    a = _matrix(SPECTRA["indefinite"][:40], _orth(40, 7))
    res = trace(
        hvp.from_dense(a), key=jax.random.key(0), num_matvecs=40, method=method, chunk_size=16
    )
    assert res.method == "exact" and res.num_matvecs == 40
    assert abs(float(res.estimate) - np.trace(a)) < 1e-10 and float(res.std_error) == 0.0


# ------------------------------------------------------------------------------------------------
# pytree vectors and a real Hessian
# ------------------------------------------------------------------------------------------------
def _pytree_like():
    return {
        "conv": {"kernel": jnp.zeros((3, 3, 2)), "bias": jnp.zeros((2,))},
        "dense": [jnp.zeros((5, 8)), jnp.zeros(())],
        "scale": jnp.zeros((1,)),
    }


@pytest.mark.parametrize("method", METHODS)
def test_pytree_shaped_operator(method):
    like = _pytree_like()
    n = tu.size(like)  # 18 + 2 + 40 + 1 + 1 = 62
    a = _matrix(np.random.default_rng(8).normal(size=n), _orth(n, 8))
    op = hvp.from_dense(a, like=like)
    est, se = _runs(op, method, 30, keys=range(20))
    z = (est - np.trace(a)) / se
    # Hutch++ here has only 10 residual samples, so z is closer to Student t with 9 degrees of freedom:
    # P(|t_9| > 5) = 7e-4 per key, P(|t_9| > 2) = 0.077 (20 keys: P(more than 5 outside) = 0.02).
    assert np.all(np.abs(z) <= 5.0) and np.sum(np.abs(z) > 2) <= 5, z


def _mlp_check(methods):
    from problems import operator, reference

    h = operator("mlp", "hessian")
    truth = float(np.trace(reference("mlp", "hessian")))
    for method in methods:
        est, se = _runs(h, method, 60, keys=range(2))
        assert np.all(np.abs(est - truth) <= 4 * se), (method, est, se, truth)


def test_mlp_hessian():
    _mlp_check(["xtrace"])


@pytest.mark.slow
def test_mlp_hessian_all_methods():  # ~10 s of compilation; the dense tests cover the same code
    _mlp_check(METHODS)


def test_matvec_callable_with_like():
    like = _pytree_like()
    n = tu.size(like)
    a = _matrix(np.random.default_rng(8).normal(size=n), _orth(n, 8))
    op = hvp.from_dense(a, like=like)
    res_fn = trace(op.mv, like=like, key=jax.random.key(0), num_matvecs=20)
    res_op = trace(op, key=jax.random.key(0), num_matvecs=20)
    np.testing.assert_allclose(float(res_fn.estimate), float(res_op.estimate), rtol=1e-12)


def test_float32_operator():
    a = _matrix(SPECTRA["flat"]).astype(np.float32)
    op = hvp.from_dense(jnp.asarray(a, jnp.float32))
    for method in ("hutch++", "xtrace"):  # the Gram-space orthonormalisation in float32
        res = trace(op, key=jax.random.key(0), num_matvecs=60, method=method)
        assert res.estimate.dtype == jnp.float32
        assert abs(float(res.estimate) - float(np.sum(SPECTRA["flat"]))) <= 4 * float(res.std_error)


# ------------------------------------------------------------------------------------------------
# adaptive mode
# ------------------------------------------------------------------------------------------------
def test_adaptive_hutchinson_meets_rtol():
    truth = float(np.sum(SPECTRA["flat"]))
    rtol = 0.005
    errs = []
    for k in range(20):
        res = trace(OPS["flat"], key=jax.random.key(k), num_matvecs=16, rtol=rtol, max_matvecs=4000)
        assert res.converged and res.num_matvecs % 16 == 0 and res.num_matvecs < 4000
        assert float(res.std_error) <= rtol * abs(float(res.estimate))
        assert res.samples.shape == (res.num_matvecs,)
        errs.append(abs(float(res.estimate) - truth) / truth)
    errs = np.array(errs)
    # the stopped estimate's error is about one standard error <= rtol |estimate|
    assert np.all(errs <= 4 * rtol) and np.sum(errs > 2 * rtol) <= 4


def test_adaptive_pools_the_fixed_budget_probes():
    fixed = trace(OPS["flat"], key=jax.random.key(3), num_matvecs=48)
    with pytest.warns(hvp.ConvergenceWarning, match=r"std_error .* after 48 products"):
        adaptive = trace(
            OPS["flat"], key=jax.random.key(3), num_matvecs=16, rtol=1e-9, max_matvecs=48
        )
    assert not adaptive.converged and adaptive.num_matvecs == 48
    np.testing.assert_allclose(np.asarray(adaptive.samples), np.asarray(fixed.samples), rtol=1e-12)


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_adaptive_restart_methods(method):
    truth = float(np.sum(SPECTRA["decaying"]))
    res = trace(
        OPS["decaying"],
        key=jax.random.key(0),
        num_matvecs=24,
        method=method,
        rtol=5e-3,
        max_matvecs=1000,
    )
    assert res.converged and float(res.std_error) <= 5e-3 * abs(float(res.estimate))
    assert abs(float(res.estimate) - truth) <= 4 * float(res.std_error) + 1e-12
    # budgets double from 24 and every product is reused: the total is 24 * 2^(r-1), r >= 2
    rounds = res.num_matvecs // 24
    assert res.num_matvecs % 24 == 0 and rounds & (rounds - 1) == 0 and rounds >= 2
    cap = trace(
        OPS["decaying"],
        key=jax.random.key(0),
        num_matvecs=24,
        method=method,
        rtol=1e-12,
        max_matvecs=50,
    )
    # rounds of 24, 48 and a last one capped at 50 (all earlier products reused)
    assert not cap.converged and 48 < cap.num_matvecs <= 50


def test_atol_stops_on_zero_trace():
    lam = np.concatenate([np.ones(N // 2), -np.ones(N // 2)])
    op = hvp.from_dense(_matrix(lam))
    res = trace(op, key=jax.random.key(0), num_matvecs=50, atol=2.0, max_matvecs=2000)
    assert res.converged and float(res.std_error) <= 2.0 and abs(float(res.estimate)) <= 8.0


# ------------------------------------------------------------------------------------------------
# determinism, chunking, jit, results
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_deterministic_and_chunk_invariant(method):
    op = OPS["indefinite"]
    a = trace(op, key=jax.random.key(7), num_matvecs=60, method=method)
    b = trace(op, key=jax.random.key(7), num_matvecs=60, method=method)
    c = trace(op, key=jax.random.key(7), num_matvecs=60, method=method, chunk_size=7)
    d = trace(op, key=jax.random.key(8), num_matvecs=60, method=method)
    assert float(a.estimate) == float(b.estimate)
    np.testing.assert_allclose(float(c.estimate), float(a.estimate), rtol=1e-10)
    np.testing.assert_allclose(float(c.std_error), float(a.std_error), rtol=1e-8)
    assert float(d.estimate) != float(a.estimate)


def test_trace_under_jit_and_raw_keys():
    op = OPS["flat"]
    f = jax.jit(lambda o, k: trace(o, key=k, num_matvecs=60, method="xtrace"))
    out = f(op, jax.random.key(2))
    ref = trace(op, key=jax.random.key(2), num_matvecs=60, method="xtrace")
    np.testing.assert_allclose(float(out.estimate), float(ref.estimate), rtol=1e-10)
    raw = trace(op, key=jax.random.PRNGKey(2), num_matvecs=10)
    assert np.isfinite(float(raw.estimate))


def test_result_fields_and_confidence_interval():
    res = trace(OPS["flat"], key=jax.random.key(0), num_matvecs=30, method="hutch++")
    assert isinstance(res, TraceResult) and res.method == "hutch++" and res.num_matvecs == 30
    assert res.converged is None and res.samples.shape == (10,)
    np.testing.assert_allclose(float(jnp.mean(res.samples)), float(res.estimate), rtol=1e-12)
    lo, hi = res.confidence_interval(0.95)
    np.testing.assert_allclose(float(hi - lo), 2 * 1.959964 * float(res.std_error), rtol=1e-5)
    d = res.to_dict()
    assert set(d) >= {"estimate", "std_error", "num_matvecs", "method", "samples", "converged"}
    one = trace(OPS["flat"], key=jax.random.key(0), num_matvecs=1)
    assert math.isinf(float(one.std_error))
    xt = trace(OPS["flat"], key=jax.random.key(0), num_matvecs=31, method="xtrace")
    assert xt.num_matvecs == 30 and xt.samples.shape == (15,)


# ------------------------------------------------------------------------------------------------
# Frobenius norm
# ------------------------------------------------------------------------------------------------
def test_frobenius_calibrated():
    a = _matrix(SPECTRA["indefinite"])
    truth = np.linalg.norm(a)
    res = [
        frobenius_norm(OPS["indefinite"], key=jax.random.key(k), num_matvecs=60) for k in range(K)
    ]
    est = np.array([float(r.estimate) for r in res])
    se = np.array([float(r.std_error) for r in res])
    _check_calibrated(est, se, truth)
    est2 = np.array([float(r.squared_estimate) for r in res])
    se2 = np.array([float(r.squared_std_error) for r in res])
    _check_calibrated(est2, se2, truth**2)
    np.testing.assert_allclose(se, se2 / (2 * est), rtol=1e-12)  # delta method


def test_frobenius_exact_pytree():
    like = _pytree_like()
    n = tu.size(like)
    a = _matrix(np.random.default_rng(9).normal(size=n), _orth(n, 9))
    res = frobenius_norm(a, like=like, key=jax.random.key(0), num_matvecs=n)
    assert res.method == "exact"
    np.testing.assert_allclose(float(res.estimate), np.linalg.norm(a), rtol=1e-12)
    r = frobenius_norm(OPS["flat"], key=jax.random.key(0), num_matvecs=60, chunk_size=16)
    np.testing.assert_allclose(
        float(r.estimate),
        float(frobenius_norm(OPS["flat"], key=jax.random.key(0), num_matvecs=60).estimate),
        rtol=1e-12,
    )
    lo, hi = r.confidence_interval(0.99, squared=True)
    assert float(lo) < float(r.squared_estimate) < float(hi)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_matvecs=0), ValueError, "at least 1"),
        (dict(num_matvecs=2, method="hutch++"), ValueError, "at least 3"),
        (dict(num_matvecs=1, method="xtrace"), ValueError, "at least 2"),
        (dict(num_matvecs=2.5), TypeError, "must be an int"),
        (dict(method="lanczos"), ValueError, "Unknown `method`"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(rtol=-1.0), ValueError, "rtol"),
        (dict(rtol=0.0), ValueError, "positive"),
        (dict(max_matvecs=500), ValueError, "adaptive mode"),
        (dict(rtol=0.1, max_matvecs=10), ValueError, "max_matvecs"),
        (dict(error_estimate="bootstrap"), ValueError, "error_estimate"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        trace(OPS["flat"], key=jax.random.key(0), **kwargs)


def test_bad_key_operator_and_nonfinite():
    with pytest.raises(TypeError, match="PRNG key"):
        trace(OPS["flat"], key=0)
    with pytest.raises(TypeError, match="like="):
        trace(lambda v: v, key=jax.random.key(0))
    with pytest.raises(ValueError, match="level"):
        trace(OPS["flat"], key=jax.random.key(0), num_matvecs=5).confidence_interval(1.5)
    bad = hvp.from_matvec(lambda v: v * jnp.nan, jnp.zeros(10))
    with pytest.raises(hvp.NonFiniteError, match="NaN or Inf"):
        trace(bad, key=jax.random.key(0), num_matvecs=5)
    with pytest.raises(hvp.NonFiniteError):
        frobenius_norm(bad, key=jax.random.key(0), num_matvecs=5)
    with pytest.raises(TypeError, match="floating"):
        trace(hvp.from_matvec(lambda v: v, jnp.zeros(10, jnp.int32)), key=jax.random.key(0))


# ------------------------------------------------------------------------------------------------
# drivers, resume, block products, transformations (issue 11)
# ------------------------------------------------------------------------------------------------
_SMALL = hvp.from_dense(_matrix(SPECTRA["indefinite"][:30], _orth(30, 11)))
_SMALL_TRUTH = float(np.sum(SPECTRA["indefinite"][:30]))


def _small(method, m=12):
    def call(**kw):
        kw.setdefault("key", jax.random.key(5))
        return trace(_SMALL, num_matvecs=m, method=method, chunk_size=5, **kw)

    return call


@pytest.mark.parametrize("method", [*METHODS, "exact"])
def test_drivers_agree(method):
    call = _small(method)
    if method == "exact":  # a budget of n = 30 products, 8 unit vectors per step

        def call(**kw):
            return trace(_SMALL, key=jax.random.key(5), num_matvecs=30, chunk_size=8, **kw)

    host, comp = assert_drivers_agree(call, rtol=1e-12)
    assert host.num_matvecs == comp.num_matvecs and type(host.num_matvecs) is int
    assert host.method == method
    if method == "exact":
        assert abs(float(host.estimate) - _SMALL_TRUTH) < 1e-12


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_resume_bitwise(method, tmp_path):
    # hutchinson: steps of 5, 5, 2 probes; hutch++ (k = 4, r = 4): S, then Q, then the residual
    assert_resume_bitwise(_small(method), tmp_path, interrupt_after=2)


_ADAPTIVE = {
    # method: (operator, round size, rtol, block products, interrupt after these products)
    # hutchinson: rounds of 8 pooled probes (4 per step) until 40 products
    "hutchinson": ("flat", 8, 3e-3, [4] * 10, (3,)),
    # hutch++: totals 6, 12, 24 (the sketch and the kept residual probes extended)
    "hutch++": ("decaying", 6, 2e-2, [2] * 6 + [4] * 3, (7,)),
    # xtrace: totals 6, 12, 24 (Omega, then Q, per round)
    "xtrace": ("decaying", 6, 2e-2, [3, 3, 3, 3, 6, 6], (3,)),
}


def _adaptive(method, **fixed):
    name, m, rtol, _, _ = _ADAPTIVE[method]

    def call(**kw):
        args = dict(key=jax.random.key(5), num_matvecs=m, method=method, rtol=rtol)
        args.update(max_matvecs=400, chunk_size=4, **fixed)
        return trace(OPS[name], **{**args, **kw})

    return call


@pytest.mark.parametrize(
    "method", ["hutchinson", "hutch++", pytest.param("xtrace", marks=pytest.mark.slow)]
)
def test_adaptive_drivers_agree_and_resume_bitwise(method, tmp_path, monkeypatch):
    call, blocks = _adaptive(method), _ADAPTIVE[method][3]
    with monkeypatch.context() as mp:
        calls = _count_blocks(mp)
        call(driver="host")
        assert calls == blocks  # the host run's block products: several random rounds
    host, comp = assert_drivers_agree(call, rtol=1e-12)
    assert host.converged and host.num_matvecs == comp.num_matvecs == sum(blocks)
    # interrupted in the first round and in later rounds (a carried sketch / pooled samples)
    for after in _ADAPTIVE[method][4]:
        _, resumed = assert_resume_bitwise(call, tmp_path, interrupt_after=after)
        assert resumed.num_matvecs == host.num_matvecs
        assert not (tmp_path / "state.npz.round").exists()


def test_adaptive_resume_in_the_exact_round(tmp_path):
    # n = 30: a random round of 4 products predicts more than n, so 30 unit vectors follow
    def call(**kw):
        return trace(
            _SMALL,
            key=jax.random.key(5),
            num_matvecs=4,
            method="hutch++",
            rtol=1e-9,
            max_matvecs=60,
            chunk_size=3,
            **kw,
        )

    for after in (2, 7):
        ref, _ = assert_resume_bitwise(call, tmp_path, interrupt_after=after)
    assert ref.method == "exact" and ref.num_matvecs == 34
    assert abs(float(ref.estimate) - _SMALL_TRUTH) < 1e-12


def test_adaptive_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "state.npz"
    orig = _driver.block_product
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return orig(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_driver, "block_product", flaky)
        with pytest.raises(KeyboardInterrupt):
            _adaptive("hutch++")(checkpoint=hvp.linalg.Checkpoint(path, every=1))
    assert path.exists()
    with pytest.raises(hvp.linalg.CheckpointMismatchError, match="settings"):
        _adaptive("hutch++")(rtol=1e-2, checkpoint=path)
    with pytest.raises(hvp.linalg.CheckpointMismatchError, match="another key"):
        _adaptive("hutch++")(key=jax.random.key(6), checkpoint=path)
    with pytest.raises(hvp.linalg.CheckpointMismatchError, match="adaptive"):
        trace(OPS["decaying"], key=jax.random.key(5), num_matvecs=6, checkpoint=path)  # fixed
    assert _adaptive("hutch++")(checkpoint=path).converged and not path.exists()


def _count_blocks(monkeypatch):
    calls = []
    orig = _driver.block_product

    def counted(op, vs, chunk_size=None):
        calls.append(tu.leading_dim(vs))
        return orig(op, vs, chunk_size)

    monkeypatch.setattr(_driver, "block_product", counted)
    return calls


@pytest.mark.parametrize(
    "method, m, chunk_size, blocks",
    [
        ("hutchinson", 12, 5, [5, 5, 2]),  # chunk_size probes per step, then the rest
        ("hutch++", 12, 5, [4, 4, 4]),  # S, Q, residual probes (k = r = 4)
        ("xtrace", 12, 5, [6, 6]),  # Omega, Q (the driver splits each into chunks)
        ("hutchinson", 30, 8, [8, 8, 8, 6]),  # m >= n: the exact path, unit vectors
    ],
)
def test_block_products(monkeypatch, method, m, chunk_size, blocks):
    calls = _count_blocks(monkeypatch)
    res = trace(_SMALL, key=jax.random.key(5), num_matvecs=m, method=method, chunk_size=chunk_size)
    assert calls == blocks and res.num_matvecs == sum(blocks)


def test_vmap_over_keys_is_the_compiled_driver():
    keys = jax.random.split(jax.random.key(0), 3)
    est = jax.vmap(lambda k: _small("hutch++")(key=k).estimate)(keys)
    ref = [float(_small("hutch++")(key=k).estimate) for k in keys]  # host driver, one by one
    np.testing.assert_allclose(np.asarray(est), ref, rtol=1e-12)


def test_progress_text_and_checkpoint_rules(tmp_path):
    alg = T.Hutchinson(count=4, step=2, chunk=2, total=4)
    state = {"samples": np.array([1.0, 2.0, 3.0, 0.0]), "pos": 3, "matvecs": 3}
    info = alg.progress(state)
    assert (info.matvecs, info.total) == (3, 4) and info.text == "trace 2 ± 0.58"
    with pytest.raises(ValueError, match="host driver"):
        trace(_SMALL, key=jax.random.key(0), rtol=0.1, driver="compiled", checkpoint=tmp_path)
    with pytest.raises(ValueError, match="host driver"):
        trace(_SMALL, key=jax.random.key(0), driver="compiled", checkpoint=tmp_path / "t.npz")
    with pytest.raises(ValueError, match="driver"):
        trace(_SMALL, key=jax.random.key(0), driver="gpu")


def test_resolve_trace_method():
    assert hvp.linalg.TRACE_METHODS == METHODS
    assert hvp.linalg.resolve_trace_method("Girard") == ("hutchinson", 1)
    assert hvp.linalg.resolve_trace_method("hutch_plus_plus") == ("hutch++", 3)
    assert hvp.linalg.resolve_trace_method("xtrace") == ("xtrace", 2)
    with pytest.raises(ValueError, match="Unknown `trace_method` 'lanczos'"):
        hvp.linalg.resolve_trace_method("lanczos", argument="trace_method")
    with pytest.raises(TypeError, match="must be a string"):
        hvp.linalg.resolve_trace_method(3)
