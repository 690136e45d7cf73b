"""Operator algebra (``op + c``, ``alpha * op``, sums, diagonals) against dense float64 matrices.

The pieces are dense operators on a nested pytree of mixed shapes (a scalar, a
vector and a matrix in dicts, lists and tuples) with PSD, singular,
indefinite and repeated-eigenvalue spectra, and the shared problems' curvature
operators (``tests/problems.py``, ``linear_regression``: ``{"w": (5, 2), "b":
(2,)}``): the GGN (PSD) and the Hessian, each checked against its own dense
float64 reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import build, reference, relative_error, sym
from problems import operator as problem_operator

import hvp
from hvp import tree as tu
from hvp.operators import DiagonalOperator, SumOperator

NAME = "linear_regression"


def _ops(dtype="float64"):
    return problem_operator(NAME, "ggn", dtype), problem_operator(NAME, "hessian", dtype)


def _refs():
    return reference(NAME, "ggn"), reference(NAME, "hessian")


#: mixed shapes (scalar, vector, matrix) in a nested pytree: n = 1 + 3 + 6 = 10
MIXED = {"a": jnp.zeros(()), "b": [jnp.zeros(3), (jnp.zeros((2, 3)),)]}


def test_combinations_match_dense_float64():
    n = tu.size(MIXED)
    a = sym(np.linspace(0.0, 3.0, n), seed=1)  # PSD, singular
    b = sym(np.r_[-2.0, -2.0, np.linspace(-1.0, 4.0, n - 2)], seed=2)  # indefinite, repeated
    A = hvp.from_dense(a, MIXED, psd=True)
    B = hvp.from_dense(b, MIXED)
    eye = np.eye(n)
    cases = [
        (A + 0.3, a + 0.3 * eye, True),
        (0.3 + A, a + 0.3 * eye, True),
        (A * 2.5, 2.5 * a, True),
        (np.float32(2.0) * A, 2.0 * a, True),
        (jnp.asarray(0.5) * A, 0.5 * a, True),
        (-B, -b, False),
        (A - B, a - b, False),
        (A + B, a + b, False),
        (2.0 * (A + 0.1) - 0.5 * B + 1.0, 2 * a + 0.2 * eye - 0.5 * b + eye, False),
        (1.0 - A / 4, eye - a / 4, False),
        (A - 1e-3, a - 1e-3 * eye, False),
        (A + A, 2 * a, True),
    ]
    for op, ref, psd in cases:
        assert isinstance(op, SumOperator)
        assert op.shape == ref.shape and op.dtype == jnp.float64
        assert op.psd is psd, repr(op)
        assert relative_error(op.dense(), ref) < 1e-14, repr(op)
    # flat representation: nested sums, scalings and dampings merge
    op = cases[8][0]
    assert len(op.terms) == 2 and float(op.damping) == pytest.approx(1.2)
    # matmat of a block of 2 mixed-shape pytree vectors = rows of the dense product
    flat = jnp.asarray(np.random.default_rng(0).normal(size=(2, n)))
    out = jax.vmap(tu.ravel)(op.matmat(jax.vmap(tu.unravel_fn(MIXED))(flat)))
    np.testing.assert_allclose(out, flat @ cases[8][1].T, rtol=1e-13, atol=1e-13)


def test_combinations_of_curvature_operators():
    G, H = _ops()
    g, h = _refs()
    eye = np.eye(g.shape[0])
    op = 2.0 * (G + 0.1) - 0.5 * H + 1.0
    assert relative_error(op.dense(), 2 * g + 1.2 * eye - 0.5 * h) < 1e-12


def test_float32_damped_sum():
    G, H = _ops("float32")
    g, h = _refs()
    op = G + H + 0.25
    assert op.dtype == jnp.float32 and op.damping.dtype == jnp.float32
    dense = op.dense()
    assert dense.dtype == jnp.float32
    assert relative_error(dense, g + h + 0.25 * np.eye(g.shape[0])) < 1e-5


def test_diagonal_and_identity():
    G, _ = _ops()
    g, _ = _refs()
    d = tu.map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / 7.0, G.like)
    D = hvp.operators.from_diagonal(d)
    assert isinstance(D, DiagonalOperator) and D.psd
    np.testing.assert_array_equal(D.dense(), np.diag(tu.ravel(d)))
    assert relative_error((G + D).dense(), g + np.diag(tu.ravel(d))) < 1e-12
    assert (G + D).psd
    eye_op = hvp.operators.identity(
        jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), G.like)
    )
    np.testing.assert_array_equal((3.0 * eye_op).dense(), 3.0 * np.eye(g.shape[0]))
    assert not hvp.operators.from_diagonal({"a": jnp.array([1.0, -1.0])}).psd
    assert hvp.operators.from_diagonal({"a": jnp.array([1.0, -1.0])}, psd=True).psd  # as declared
    assert not jax.jit(lambda x: jnp.array(hvp.operators.from_diagonal(x).psd))(jnp.ones(2))


def test_psd_flags():
    G, H = _ops()
    F = problem_operator(NAME, "empirical_fisher")
    assert (G.psd, F.psd, H.psd) == (True, True, False)
    assert (G + 1e-3).psd and (2.0 * G).psd and (G + F).psd and (G + 0.0).psd
    assert not (G - 1e-3).psd and not (-G).psd and not (G + H).psd and not (H + 10.0).psd
    assert not (G - F).psd
    dense = jnp.eye(2)
    assert not hvp.from_dense(dense).psd and hvp.from_dense(dense, psd=True).psd
    assert not hvp.from_matvec(lambda v: v, jnp.zeros(2)).psd
    assert hvp.from_matvec(lambda v: v, jnp.zeros(2), psd=True).psd
    # the GGN is PSD when the output loss is known to be convex (hvp.losses, or `convex = True`)
    p = build("logistic_regression")
    loss = p.output_loss
    assert not hvp.ggn(p.model_fn, loss, p.params, p.batches).psd

    def convex_loss(o, t):
        return loss(o, t)

    convex_loss.convex = True
    assert hvp.ggn(p.model_fn, convex_loss, p.params, p.batches).psd
    # a traced scalar is taken as non-negative: the damped GGN stays PSD inside jit
    assert jax.jit(lambda lam: jnp.array((G + lam).psd))(jnp.asarray(-1.0))
    assert not jax.jit(lambda lam: jnp.array((G - lam).psd))(jnp.asarray(1.0))
    assert not jax.jit(lambda lam: jnp.array((-(lam * G)).psd))(jnp.asarray(1.0))
    assert (G - (-1.0)).psd and not (G * -2.0).psd and (G / 2.0).psd
    assert "psd=True" in repr(G + 0.5) and "0.5 * I" in repr(G + 0.5)


def test_errors():
    G, H = _ops()
    other = hvp.from_dense(jnp.eye(3))
    with pytest.raises(ValueError, match="different pytree structures"):
        G + other
    shifted = hvp.from_matvec(lambda v: v, tu.map(lambda x: x.astype(jnp.float32), G.like))
    with pytest.raises(ValueError, match=r"leaf .* float32"):
        G - shifted
    with pytest.raises(TypeError, match="not symmetric"):
        G * H
    with pytest.raises(ValueError, match="from_diagonal"):
        G + jnp.ones(3)
    with pytest.raises(TypeError, match="from_diagonal"):
        G + {"a": 1.0}
    with pytest.raises(TypeError, match="bool"):
        G + True
    with pytest.raises(ValueError, match="finite"):
        G + float("nan")
    with pytest.raises(TypeError, match="by a scalar"):
        2j * G
    with pytest.raises(ZeroDivisionError):
        G / 0
    with pytest.raises(TypeError, match="psd"):
        hvp.from_dense(jnp.eye(2), psd="yes")
    with pytest.raises(TypeError, match="floating"):
        hvp.operators.from_diagonal({"a": jnp.arange(3)})
    with pytest.raises(ValueError, match="NaN"):
        hvp.operators.from_diagonal(jnp.array([1.0, jnp.inf]))


def test_traced_damping_does_not_retrace_and_reuses_the_loss_trace():
    p = build("linear_regression")
    traces = {"model": 0, "jit": 0}

    def model_fn(params, x):
        traces["model"] += 1
        return p.model_fn(params, x)

    G = hvp.ggn(model_fn, p.output_loss, p.params, p.batches)
    v = tu.ones_like(p.params)
    ref = reference("linear_regression", "ggn")
    G.mv(v)
    after_first = traces["model"]

    @jax.jit
    def step(op, lam, v):
        traces["jit"] += 1
        damped = op + lam
        return damped.mv(v), damped.matmat(tu.map(lambda x: jnp.stack([x, 2 * x]), v))

    for lam in (0.1, 0.2, 0.3):
        out, block = step(G, jnp.asarray(lam), v)
        expect = (ref + lam * np.eye(ref.shape[0])) @ tu.ravel(v)
        np.testing.assert_allclose(tu.ravel(out), expect, rtol=1e-12)
        np.testing.assert_allclose(tu.ravel(tu.index(block, 1)), 2 * expect, rtol=1e-12)
    assert traces["jit"] == 1

    # a damped operator passed into jit with new Python-float dampings: one compile
    apply = jax.jit(lambda op, v: op.mv(v))
    before = apply._cache_size()
    for lam in (1e-3, 2e-3, 5e-2):
        apply(G + lam, v)
    assert apply._cache_size() == before + 1
    # the user's model was traced for G's product once; sums and dampings reuse that trace
    (3.0 * G + 1.0).mv(v)
    (G + G).mv(v)
    assert traces["model"] == after_first
    # vmap over dampings
    outs = jax.vmap(lambda lam: tu.ravel((G + lam).mv(v)))(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(outs[1] - outs[0], tu.ravel(v), rtol=1e-12)


def test_eigsh_and_trace_of_combinations():
    n = tu.size(MIXED)
    b = sym(np.r_[-2.0, -2.0, np.linspace(-1.0, 4.0, n - 2)], seed=2)
    a = sym(np.linspace(0.0, 3.0, n), seed=1)
    B = hvp.from_dense(b, MIXED)
    A = hvp.from_dense(a, MIXED, psd=True)
    r = hvp.eigsh(B + 0.7, 1, key=jax.random.key(0), which="smallest")  # a double eigenvalue
    assert bool(r.converged.all())
    np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(b)[:1] + 0.7, rtol=1e-10)
    t = hvp.trace(A - 0.5 * B, key=jax.random.key(1), num_matvecs=n)
    assert t.method == "exact"
    assert float(t.estimate) == pytest.approx(np.trace(a - 0.5 * b), rel=1e-12)
