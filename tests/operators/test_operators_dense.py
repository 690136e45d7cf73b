"""Every curvature operator against its dense float64 reference, on every shared problem.

References (``tests/problems.py``): ``jax.hessian`` on raveled parameters over
the concatenated data set; the GGN from explicit per-example Jacobians and
output-loss Hessians; the empirical Fisher from explicit per-example gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import (
    ALL_PROBLEMS,
    GGN_PROBLEMS,
    KINDS,
    build,
    make_operator,
    relative_error,
)
from problems import operator as _problem_operator
from problems import reference as _problem_reference

from hvp import tree as tu

# Default run: every problem once, every kind and code path (closed-form and generic output
# Hessians, dict batches, nested parameters, convolutions, linearisation) at least once. The
# remaining problem x kind combinations exercise the same code and run with `-m slow`.
# "hessian" is the default operator (linearize="auto": linearised on these small problems);
# "hessian_forward" is forward-over-reverse (linearize=False).
FAST_CASES = [
    ("quadratic", "hessian"),
    ("mlp", "hessian"),
    ("cnn", "hessian"),  # convolutions (forward-over-reverse on the CNN runs with -m slow)
    ("dict_batch", "hessian"),
    ("nested", "hessian_forward"),
    ("nested", "hessian_linearized"),
    ("logistic_regression", "ggn"),  # output loss without output_hvp
    ("dict_batch", "ggn"),  # softmax cross-entropy closed form, dict batch
    ("nested", "ggn"),  # mean squared error closed form
    ("linear_regression", "empirical_fisher"),
    ("dict_batch", "empirical_fisher"),
    ("nested", "empirical_fisher"),
]
ALL_CASES = [
    (name, kind)
    for name in ALL_PROBLEMS
    for kind in KINDS
    if (kind != "ggn" or name in GGN_PROBLEMS)
    and (kind != "hessian_linearized" or name in ("quadratic", "mlp", "nested"))
] + [(name, "hessian_forward") for name in ALL_PROBLEMS]
CASES = FAST_CASES + [
    pytest.param(*case, marks=pytest.mark.slow) for case in ALL_CASES if case not in FAST_CASES
]
F32_CASES = [("mlp", "hessian"), ("nested", "ggn"), ("nested", "empirical_fisher")]


@functools.cache
def operator(name, kind, dtype="float64"):
    """The shared problems' cached operators, plus ``"hessian_forward"`` (``linearize=False``)."""
    if kind == "hessian_forward":
        return make_operator(build(name, dtype), "hessian", linearize=False)
    return _problem_operator(name, kind, dtype)


def reference(name, kind, dtype="float64"):
    return _problem_reference(name, "hessian" if kind == "hessian_forward" else kind, dtype)


def _dense(op):
    return np.asarray(op.dense(chunk_size=op.size))  # one compiled matmat for the whole matrix


def _probes(params, count, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), count)
    return [tu.normal_like(k, params) for k in keys]


@pytest.mark.parametrize("name,kind", CASES)
def test_dense_matches_reference_float64(name, kind):
    op = operator(name, kind)
    ref = reference(name, kind)
    if kind.startswith("hessian"):  # small problems: "auto" linearises
        assert op.linearized == (kind != "hessian_forward")
    dense = _dense(op)
    assert dense.shape == ref.shape == (op.size, op.size)
    assert relative_error(dense, ref) < 1e-10
    # products with random vectors agree with the reference matrix too
    for v in _probes(op.params, 2, seed=1):
        hv = op @ v
        tu.assert_same_structure(hv, op.params)
        assert relative_error(tu.ravel(hv), ref @ np.asarray(tu.ravel(v))) < 1e-10


@pytest.mark.parametrize("name,kind", F32_CASES)
def test_dense_matches_reference_float32(name, kind):
    op = operator(name, kind, "float32")
    assert op.dtype == jnp.float32
    # the float64 problem's reference: its data and point differ by float32 rounding only (~1e-7)
    ref = reference(name, kind)
    if name == "mlp":
        dense = _dense(op)
        assert dense.dtype == np.float32
        assert relative_error(dense, ref) < 1e-4
    (v,) = _probes(op.params, 1, seed=2)
    hv = op @ v
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(hv))
    assert relative_error(tu.ravel(hv), ref @ np.asarray(tu.ravel(v), np.float64)) < 1e-4


def test_quadratic_reference_is_the_known_hessian():
    p = build("quadratic")
    assert relative_error(reference("quadratic", "hessian"), p.hessian) < 1e-14
    assert relative_error(_dense(operator("quadratic", "hessian")), p.hessian) < 1e-12


@pytest.mark.parametrize("name,kind", CASES)
def test_symmetry(name, kind):
    op = operator(name, kind)
    u, v = _probes(op.params, 2, seed=3)
    uhv = float(tu.dot(u, op @ v))
    vhu = float(tu.dot(v, op @ u))
    assert abs(uhv - vhu) <= 1e-12 * max(1.0, abs(uhv))
    assert abs(uhv) > 1e-8  # not trivially zero


@pytest.mark.parametrize("name,kind", [("nested", k) for k in KINDS])
def test_matmat_equals_stacked_matvecs(name, kind):
    op = operator(name, kind)
    vs = _probes(op.params, 3, seed=4)
    block = op.matmat(tu.stack(vs))
    tu.assert_same_structure(block, op.params, leading=1)
    for i, v in enumerate(vs):
        assert relative_error(tu.ravel(tu.index(block, i)), tu.ravel(op @ v)) < 1e-12


@pytest.mark.parametrize(
    "name,kind",
    [c for c in FAST_CASES if c[1] in ("ggn", "empirical_fisher") and c[0] in GGN_PROBLEMS],
)
def test_gauss_newton_and_fisher_are_psd(name, kind):
    # every output loss in problems.py is convex in the outputs, so the GGN is PSD
    eigs = np.linalg.eigvalsh(_dense(operator(name, kind)))
    assert eigs[-1] > 0
    assert eigs[0] >= -1e-10 * eigs[-1]


@pytest.mark.parametrize("name", ["mlp", "cnn", "nested", "quadratic"])
def test_hessian_is_indefinite(name):
    eigs = np.linalg.eigvalsh(_dense(operator(name, "hessian")))
    assert eigs[0] < -1e-3 * eigs[-1] < 0
