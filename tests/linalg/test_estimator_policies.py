"""Policies shared by power_iteration, spectral_density, trace, diagonal and frobenius_norm.

* Precision (issue 9 section 2): products in the parameters' dtype, reductions and small
  factorisations in >= float32; bfloat16/float16 runs agree with the float32 run within
  a bound stated per test; an overflow raises ``hvp.NonFiniteError``.
* Budgets (issue 9 section 4): adaptive trace never spends ``n`` products without
  returning the exact trace, reuses earlier products, and ``num_matvecs`` is what the
  operator really computed (counted by an instrumented matvec).
* Validation (issue 12 section 4): one key message everywhere, ``inf`` refused,
  every algorithm usable under ``jax.jit`` (and SLQ under ``vmap``).
* Memory (issue 18): the default block size.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import make_operator, mlp, quadratic, sym

import hvp
from hvp import tree as tu
from hvp.linalg import _checks as C
from hvp.linalg import _trace as T
from hvp.linalg import diagonal, frobenius_norm, power_iteration, spectral_density, trace
from hvp.linalg._probes import probes

N = 64
EIGS = np.concatenate([[6.0], np.linspace(-2.0, 3.0, N - 1)])  # |6| dominates: ratio 0.5
A64 = sym(EIGS, seed=5)
HALF = [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)]


def _dense(dtype):
    return hvp.from_dense(jnp.asarray(A64, dtype))


def _eps(dtype):
    return float(jnp.finfo(dtype).eps)


# ------------------------------------------------------------------------------------------------
# precision
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_agrees_with_float32_dense(dtype):
    """Every algorithm on a half-precision ``from_dense`` operator vs the float32 run.

    Bound: the matrix itself is rounded to the half dtype (relative entry error eps/2)
    and each product rounds its output once more, so every product ``A v`` is off by
    about ``eps * ||A||_2 ||v||``; quantities computed from a handful of products are off
    by a small multiple of that. We allow ``8 eps`` relative to the natural scale of
    each quantity (``||A||_2 = 6``; the trace's scale is ``sqrt(n) ||A||_2``), i.e.
    6e-2 (bfloat16) and 8e-3 (float16); float32-accumulated reductions add nothing.
    """
    eps, key = _eps(dtype), jax.random.key(0)
    scale = float(np.abs(EIGS).max())

    @partial(jax.jit, static_argnums=1)  # one compilation per dtype for all the algorithms
    def run(op, tol):
        return (
            power_iteration(op, key=key, num_iters=200, tol=tol),
            [
                trace(op, key=key, num_matvecs=30, method=m)
                for m in ("hutchinson", "hutch++", "xtrace")
            ],
            diagonal(op, key=key, num_matvecs=20),
            frobenius_norm(op, key=key, num_matvecs=20),
            spectral_density(op, key=key, num_probes=4, num_iters=12),
        )

    p32, t32, d32, f32, s32 = run(_dense(jnp.float32), 1e-5)
    p16, t16, d16, f16, s16 = run(_dense(dtype), 4 * eps)
    name = jnp.dtype(dtype).name
    for res in (p16, *t16, d16, f16, s16):
        assert res.dtype_policy == C.DtypePolicy(compute=name, accumulate="float32")

    assert bool(p16.converged) and p16.eigenvalue.dtype == jnp.float32
    assert abs(float(p16.eigenvalue) - float(p32.eigenvalue)) <= 8 * eps * scale
    assert jnp.result_type(p16.eigenvector) == dtype  # the vector keeps the params' dtype

    for a, b in zip(t16, t32):
        assert abs(float(a.estimate) - float(b.estimate)) <= 8 * eps * scale * np.sqrt(N)
        assert np.isfinite(float(a.std_error))

    assert d16.estimate.dtype == jnp.float32
    np.testing.assert_allclose(d16.estimate, d32.estimate, atol=8 * eps * scale)
    assert abs(float(f16.estimate) - float(f32.estimate)) <= 8 * eps * float(f32.estimate)

    assert s16.nodes.dtype == jnp.float32
    # quadrature moments tr(A), tr(A^2) from the same probes, and the measures themselves
    for f, sc in ((lambda t: t, scale * N), (lambda t: t**2, scale**2 * N)):
        a, b = float(s16.trace_fn(f).estimate), float(s32.trace_fn(f).estimate)
        assert abs(a - b) <= 8 * eps * sc
    w1 = s16.wasserstein1(np.asarray(s32.nodes).ravel(), np.asarray(s32.weights).ravel())
    assert w1 <= 8 * eps * scale


@pytest.mark.slow  # ~40 s of compilation; the from_dense test covers the same code
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_mlp_hessian(dtype):
    """The MLP Hessian (n = 334) with parameters and data cast to the half dtype.

    The half-precision model is a different function (rounded weights and inputs,
    half-precision activations), so the bound is looser: 5 % of the float32 value for
    the top eigenvalue and the trace (measured: bfloat16 0.3 % / 1 %, float16 0.1 %).
    """
    key = jax.random.key(1)
    h32 = make_operator(mlp(jnp.float32), "hessian")
    h16 = make_operator(mlp(dtype), "hessian")
    p32 = power_iteration(h32, key=key, num_iters=60, tol=1e-3)
    p16 = power_iteration(h16, key=key, num_iters=60, tol=1e-2)
    assert p16.dtype_policy.compute == jnp.dtype(dtype).name
    assert abs(float(p16.eigenvalue) - float(p32.eigenvalue)) <= 0.05 * abs(float(p32.eigenvalue))
    t32 = trace(h32, key=key, num_matvecs=12, method="xtrace")
    t16 = trace(h16, key=key, num_matvecs=12, method="xtrace")
    assert abs(float(t16.estimate) - float(t32.estimate)) <= 0.05 * abs(float(t32.estimate))


def test_float16_power_iteration_is_not_a_silent_zero():
    """Issue 9: a float16 norm overflowed and power_iteration returned 0.0 "converged".

    Here ``||A v||^2 = 540^2 * ...`` exceeds float16's 65504 while every entry is finite:
    the norm is taken in float32, so the eigenvalue matches the float32 run.
    """
    eigs = np.concatenate([[-540.4], np.linspace(-100.0, 100.0, N - 1)])
    a = sym(eigs, seed=1)
    op = hvp.from_dense(jnp.asarray(a, jnp.float16))
    r16 = power_iteration(op, key=jax.random.key(0), tol=1e-2)
    assert bool(r16.converged)
    assert abs(float(r16.eigenvalue) + 540.4) <= 8 * _eps(jnp.float16) * 540.4


def test_float16_overflow_raises_everywhere():
    """Products that really overflow (entries above 65504) raise NonFiniteError, never return 0."""
    op = hvp.from_dense(jnp.full((8, 8), 6e4, jnp.float16))  # A z = 6e4 * sum(z): inf in float16
    key = jax.random.key(0)
    msg = "NaN or Inf"
    with pytest.raises(hvp.NonFiniteError, match=msg):
        power_iteration(op, key=key)
    with pytest.raises(hvp.NonFiniteError, match=msg):
        trace(op, key=key, num_matvecs=6, method="xtrace")
    with pytest.raises(hvp.NonFiniteError, match=msg):
        diagonal(op, key=key, num_matvecs=6)
    with pytest.raises(hvp.NonFiniteError, match=msg):
        frobenius_norm(op, key=key, num_matvecs=6)
    with pytest.raises(hvp.NonFiniteError, match=msg):
        spectral_density(op, key=key, num_probes=2, num_iters=4)


def test_power_iteration_nonfinite_message_is_actionable():
    bad = hvp.from_matvec(lambda v: v * jnp.nan, jnp.zeros(10))
    with pytest.raises(hvp.NonFiniteError) as err:
        power_iteration(bad, key=jax.random.key(0))
    assert "check_finite=True" not in str(err.value)  # already the default (issue 9 section 5)
    assert "nonfinite_leaves" in str(err.value)


# ------------------------------------------------------------------------------------------------
# adaptive budgets
# ------------------------------------------------------------------------------------------------
def _counted(op):
    """``op`` as a matvec that counts the products really computed (also under jit/vmap/map)."""
    count = [0]

    def tick(_):
        count[0] += 1

    def mv(v):
        jax.debug.callback(tick, tu.ravel(v)[0])
        return op.matvec(v)

    return hvp.from_matvec(mv, op.like), count


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("num_matvecs", [4, 100])
def test_adaptive_on_a_12_parameter_block_is_exact_within_n(method, num_matvecs):
    """Issue 9 section 4: rtol=0.01 on 12 parameters spent 500 products and missed the trace."""
    prob = quadratic()
    h = make_operator(prob, "hessian")
    truth = float(np.trace(np.asarray(prob.hessian)))
    op, count = _counted(h)
    n = op.size
    assert n == 12
    res = trace(op, key=jax.random.key(0), num_matvecs=num_matvecs, method=method, rtol=0.01)
    assert res.converged
    assert count[0] == res.num_matvecs  # honest accounting
    if res.method == "exact":
        assert float(res.std_error) == 0.0
        np.testing.assert_allclose(float(res.estimate), truth, rtol=1e-12)
        # random rounds stay below n, then n exact products
        assert res.num_matvecs - n < n
    else:
        assert res.num_matvecs < n
    if num_matvecs >= n:
        assert res.method == "exact" and res.num_matvecs == n


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_adaptive_rounds_reuse_products(method):
    """Totals double (12, 24, 48, ...) with nothing recomputed, checked by counting products."""
    op, count = _counted(hvp.from_dense(sym(1.0 / np.arange(1, 201) ** 1.5, seed=2)))
    res = trace(op, key=jax.random.key(1), num_matvecs=12, method=method, rtol=2e-2)
    assert res.method == method and res.converged
    assert count[0] == res.num_matvecs  # (restarting would have spent 12 * (2^r - 1))
    rounds = res.num_matvecs // 12
    assert res.num_matvecs % 12 == 0 and rounds & (rounds - 1) == 0 and rounds >= 2


def test_adaptive_hutchpp_round_equals_the_fixed_budget_run():
    """Round 2 of adaptive Hutch++ (48 products, 24 of them reused) is Hutch++ with 48."""
    op = hvp.from_dense(sym(1.0 / np.arange(1, 151), seed=3))
    fixed = trace(op, key=jax.random.key(4), num_matvecs=48, method="hutch++")
    adaptive = trace(
        op, key=jax.random.key(4), num_matvecs=24, method="hutch++", rtol=1e-9, max_matvecs=48
    )
    assert adaptive.num_matvecs == 48 and not adaptive.converged
    np.testing.assert_allclose(adaptive.samples, fixed.samples, rtol=1e-9, atol=1e-12)


def test_xtrace_extension_equals_one_shot_xtrace():
    """Extending XTrace's sketch by block Gram-Schmidt gives the same leave-one-out t_i."""
    op = hvp.from_dense(sym(np.linspace(-1.0, 2.0, 80) ** 3, seed=6))
    omega = probes(jax.random.key(2), op.like, 16, "normal")
    first, second = tu.map(lambda x: x[:10], omega), tu.map(lambda x: x[10:], omega)

    _, _, _, carry = T._xtrace_round(op, first, shift=0.0)
    _, se, samples, carry = T._xtrace_round(op, second, carry, shift=0.0)
    _, s1, t1, _ = T._xtrace_round(op, omega, shift=0.0)
    assert int(carry["matvecs"]) == 32  # 2 x 16 products, none redone
    np.testing.assert_allclose(samples, t1, rtol=1e-8)
    np.testing.assert_allclose(float(se), float(s1), rtol=1e-6)


def test_adaptive_without_room_for_exact_stays_below_n():
    op, count = _counted(hvp.from_dense(sym(np.linspace(1.0, 2.0, 40), seed=7)))
    res = trace(op, key=jax.random.key(0), num_matvecs=8, rtol=1e-9, max_matvecs=45)
    assert not res.converged and res.method == "hutchinson"
    assert res.num_matvecs < 40 and count[0] == res.num_matvecs


# ------------------------------------------------------------------------------------------------
# validation: keys, non-finite numbers
# ------------------------------------------------------------------------------------------------
def _calls(op):
    return {
        "power_iteration": lambda **kw: power_iteration(op, num_iters=3, **kw),
        "spectral_density": lambda **kw: spectral_density(op, num_probes=2, num_iters=3, **kw),
        "trace": lambda **kw: trace(op, num_matvecs=3, **kw),
        "diagonal": lambda **kw: diagonal(op, num_matvecs=3, **kw),
        "frobenius_norm": lambda **kw: frobenius_norm(op, num_matvecs=3, **kw),
        "spectrum_summary": lambda **kw: hvp.spectrum_summary(op, num_probes=2, num_iters=3, **kw),
    }


@pytest.mark.parametrize("name", list(_calls(None)))
def test_one_key_message_everywhere(name):
    call = _calls(_dense(jnp.float64))[name]
    for bad in (0, np.int64(3), 1.5, None, "0"):
        with pytest.raises(TypeError, match=r"pass key=jax\.random\.key\(seed\)"):
            call(key=bad)
    with pytest.raises(ValueError, match=r"single PRNG key.*pass key=jax\.random\.key\(seed\)"):
        call(key=jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="single PRNG key"):
        call(key=jax.random.split(jax.random.PRNGKey(0), 3))
    a = call(key=jax.random.key(0))  # typed and raw keys are both accepted
    b = call(key=jax.random.PRNGKey(0))
    assert type(a) is type(b)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), -1.0])
def test_non_finite_floats_refused(bad):
    op, key = _dense(jnp.float64), jax.random.key(0)
    with pytest.raises(ValueError, match="`tol` must be a finite number"):
        power_iteration(op, key=key, tol=bad)
    with pytest.raises(ValueError, match="`rtol` must be a finite number"):
        trace(op, key=key, rtol=bad)
    with pytest.raises(ValueError, match="`atol` must be a finite number"):
        trace(op, key=key, atol=bad)
    with pytest.raises(ValueError, match="`tol` must be a finite number"):
        hvp.spectrum_summary(op, key=key, tol=bad)


def test_spectrum_summary_checks_its_numbers_before_any_product():
    op, key = _dense(jnp.float64), jax.random.key(0)
    for kw, err, msg in [
        ({"num_probes": 0}, ValueError, "`num_probes` must be at least 1"),
        ({"num_iters": 2.5}, TypeError, "`num_iters` must be an int"),
        ({"tol": "1e-6"}, TypeError, "`tol` must be a number"),
        ({"zero_tol": 1.0}, ValueError, "`zero_tol` must be a non-negative float below 1"),
    ]:
        with pytest.raises(err, match=msg):
            hvp.spectrum_summary(op, key=key, **kw)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -1.0])
def test_spectral_density_helpers_refuse_non_finite(bad):
    sd = hvp.SpectralDensity(
        nodes=jnp.array([[1.0, 2.0]]), weights=jnp.array([[0.5, 0.5]]), num_matvecs=2, size=2
    )
    with pytest.raises(ValueError, match="`sigma` must be a finite number > 0"):
        sd.density(np.linspace(0.0, 3.0, 5), sigma=bad)
    with pytest.raises(ValueError, match="`sigma` must be a finite number > 0"):
        sd.grid(10, sigma=bad)
    if not np.isfinite(bad):
        with pytest.raises(ValueError, match="`threshold` must be a finite number"):
            sd.negative_mass(threshold=bad)
    assert float(sd.negative_mass()) == 0.0 and float(sd.positive_mass(threshold=1.5)) == 0.5


# ------------------------------------------------------------------------------------------------
# transformations
# ------------------------------------------------------------------------------------------------
def test_every_estimator_under_jit():
    """Each algorithm compiled as a whole, checked against the dense float64 truth."""
    op, key = _dense(jnp.float64), jax.random.key(3)

    @jax.jit
    def run(o, k):
        p = power_iteration(o, key=k, num_iters=80, tol=1e-8)
        s = spectral_density(o, key=k, num_probes=3, num_iters=N)
        t = trace(o, key=k, num_matvecs=9, method="hutch++")
        d = diagonal(o, key=k, num_matvecs=N)  # n products: exact
        f = frobenius_norm(o, key=k, num_matvecs=N)
        return p, s, t, d, f

    p, s, t, d, f = run(op, key)
    assert bool(p.converged) and abs(float(p.eigenvalue) - 6.0) < 1e-6
    np.testing.assert_allclose(np.sort(np.asarray(s.nodes[0])), np.sort(EIGS), atol=1e-6)
    assert abs(float(t.estimate) - EIGS.sum()) <= 4 * float(t.std_error)
    np.testing.assert_allclose(d.estimate, np.diag(A64), atol=1e-12)
    np.testing.assert_allclose(float(f.estimate), np.linalg.norm(A64), rtol=1e-12)


def test_spectral_density_under_vmap_over_keys():
    op = _dense(jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    nodes = jax.vmap(lambda k: spectral_density(op, key=k, num_probes=2, num_iters=5).nodes)(keys)
    assert nodes.shape == (3, 2, 5)
    one = spectral_density(op, key=keys[1], num_probes=2, num_iters=5).nodes
    np.testing.assert_allclose(nodes[1], one, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# memory: default block size
# ------------------------------------------------------------------------------------------------
def test_default_block_size_rule():
    assert C.DEFAULT_MAX_CHUNK == 8
    assert C.default_chunk_size(99) == 8  # the 99 probes: 8 at a time
    assert C.default_chunk_size(3) == 3
    assert C.default_chunk_size(99, bytes_per_probe=300 << 20) == 3  # 3 x 300 MiB <= 1 GiB
    assert C.default_chunk_size(99, bytes_per_probe=4 << 30) == 1  # never below 1
    assert C.resolve_chunk(None, 99) == 8 and C.resolve_chunk(50, 20) == 20
    with pytest.raises(ValueError, match="chunk_size"):
        C.resolve_chunk(0, 10)


def test_results_do_not_depend_on_the_block_size():
    op, key = _dense(jnp.float64), jax.random.key(5)  # default: 8 at a time
    d_auto = diagonal(op, key=key, num_matvecs=20)
    d_all = diagonal(op, key=key, num_matvecs=20, chunk_size=20)
    np.testing.assert_allclose(d_auto.estimate, d_all.estimate, rtol=1e-12)
    s_auto = spectral_density(op, key=key, num_probes=10, num_iters=5)
    s_all = spectral_density(op, key=key, num_probes=10, num_iters=5, chunk_size=10)
    np.testing.assert_allclose(s_auto.nodes, s_all.nodes, rtol=1e-10, atol=1e-12)
