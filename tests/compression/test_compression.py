"""hvp.compression against dense float64 references on a tiny model."""

import functools
import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import hvp
from hvp.compression import (
    obd_saliency,
    pruning_mask,
    quantization_sensitivity,
    uniform_quantize,
)

KEY = jax.random.key(0)


@functools.lru_cache(maxsize=1)
def _model():
    """A tanh MLP 4-5-3 with softmax cross-entropy; n = 25 + 18 = 43 (two layers: two Lanczos compiles)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = rng.integers(0, 3, size=30)
    params = {
        "dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 5))), "bias": jnp.zeros(5)},
        "out": {"kernel": jnp.asarray(rng.normal(size=(5, 3))), "bias": jnp.zeros(3)},
    }

    def loss(p, b):
        h = jnp.tanh(b[0] @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
        return hvp.losses.softmax_cross_entropy(h @ p["out"]["kernel"] + p["out"]["bias"], b[1])

    H = hvp.hessian(loss, params, [(x[:16], y[:16]), (x[16:], y[16:])])
    dense = np.asarray(H.dense())
    return params, H, dense


def _block(params, dense, layer):
    """Index of the layer's kernel entries in ravel order (``jax.flatten_util`` = tree_leaves order)."""
    start, idx = 0, None
    for path, x in zip(hvp.tree.leaf_paths(params), jax.tree_util.tree_leaves(params)):
        if path == f"{layer}/kernel":
            idx = np.arange(start, start + x.size)
        start += x.size
    return idx


def test_uniform_quantize_levels_scale_and_error():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 4))
    w[:, 2] = 0.0  # a zero channel stays zero
    for b in (2, 3, 4, 8):
        q = np.asarray(uniform_quantize(jnp.asarray(w), b))
        levels = 2 ** (b - 1) - 1
        scale = np.abs(w).max(axis=0) / levels
        np.testing.assert_array_equal(q[:, 2], 0.0)
        for c in (0, 1, 3):
            k = q[:, c] / scale[c]
            np.testing.assert_allclose(k, np.round(k), atol=1e-9)  # on the grid
            assert np.abs(k).max() <= levels + 1e-9
            assert len(np.unique(np.round(k))) <= 2 * levels + 1
            assert np.abs(q[:, c] - w[:, c]).max() <= scale[c] / 2 + 1e-12
            # the channel's largest magnitude is a level: represented exactly
            i = np.abs(w[:, c]).argmax()
            assert q[i, c] == pytest.approx(w[i, c], abs=1e-12)
    # more bits, smaller error; a vector has one scale; float32 stays float32
    errs = [float(np.sum((uniform_quantize(jnp.asarray(w), b) - w) ** 2)) for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
    v = jnp.array([0.5, -1.0, 0.26], jnp.float32)
    assert uniform_quantize(v, 2).tolist() == [0.0, -1.0, 0.0]
    assert uniform_quantize(v, 2).dtype == jnp.float32
    with pytest.raises(ValueError, match="at least 2"):
        uniform_quantize(v, 1)


def test_sensitivity_exact_against_the_dense_hessian():
    params, H, dense = _model()
    s = quantization_sensitivity(H, key=KEY, num_matvecs=10_000)  # >= n: the exact diagonal
    assert s.method == "exact" and s.layers == ("dense_0", "out")
    for i, layer in enumerate(s.layers):
        idx = _block(params, dense, layer)
        block = dense[np.ix_(idx, idx)]
        w = np.asarray(params[layer]["kernel"])
        assert s.num_params[i] == w.size
        np.testing.assert_allclose(s.trace[i], np.trace(block), rtol=1e-10, atol=1e-12)
        for j, b in enumerate(s.bits):
            pert = np.sum((np.asarray(uniform_quantize(jnp.asarray(w), b)) - w) ** 2)
            ref = np.trace(block) / w.size * pert
            np.testing.assert_allclose(s.omega[i, j], ref, rtol=1e-10, atol=1e-14)
        # the block's top eigenvalue (Lanczos on A_ll), within its residual bound and eig_tol
        top = np.linalg.eigvalsh(block)[-1]
        assert abs(s.top_eigenvalue[i] - top) <= max(s.top_eigenvalue_residual[i], 1e-8)
        assert bool(s.top_eigenvalue_converged[i])  # carried through from eigsh
    assert set(s.ranking) == set(s.layers)
    first = [s.omega[s.layers.index(name), 0] for name in s.ranking]
    assert first == sorted(first, reverse=True)
    assert s.to_json()  # JSON-serialisable


def test_sensitivity_std_error_and_obd_statistics():
    params, H, dense = _model()
    d = hvp.diagonal(H, key=KEY, num_matvecs=40)
    s = quantization_sensitivity(H, key=KEY, diag=d, top_eigenvalue=False)
    assert s.num_matvecs == 0 and s.samples.shape == (40, 2)
    for i, layer in enumerate(s.layers):
        idx = _block(params, dense, layer)
        z = (s.trace[i] - np.trace(dense[np.ix_(idx, idx)])) / s.trace_std_error[i]
        assert abs(z) < 4, (layer, z)
    np.testing.assert_allclose(
        s.omega_std_error, s.trace_std_error[:, None] / s.num_params[:, None] * s.perturbation
    )
    # OBD: 1/2 H_ii w_i^2 against the dense diagonal, z-scores of the Hutchinson estimate
    o = obd_saliency(H, key=KEY, diag=d)
    flat_w = np.asarray(jax.flatten_util.ravel_pytree(params)[0])
    ref = 0.5 * np.diag(dense) * flat_w**2
    est = np.asarray(jax.flatten_util.ravel_pytree(o.saliency)[0])
    se = np.asarray(jax.flatten_util.ravel_pytree(o.std_error)[0])
    ok = se > 0  # zero weights (biases at 0) have zero saliency and zero error
    z = (est[ok] - ref[ok]) / se[ok]
    assert 0.3 < np.mean(z**2) < 3.0, np.mean(z**2)  # ~1 for honest errors
    np.testing.assert_array_equal(est[~ok], 0.0)
    # exact diagonal: exact saliency
    o = obd_saliency(H, key=KEY, num_matvecs=10_000)
    est = np.asarray(jax.flatten_util.ravel_pytree(o.saliency)[0])
    np.testing.assert_allclose(est, ref, rtol=1e-10, atol=1e-14)
    assert o.method == "exact"


def test_pruning_mask_sparsity_is_exact():
    params, _, _ = _model()
    scores = jax.tree_util.tree_map(jnp.abs, params)
    kernels = {k: np.asarray(v["kernel"]) for k, v in params.items()}
    n = sum(v.size for v in kernels.values())  # 20 + 15 = 35 prunable
    for sparsity in (0.0, 0.5, 0.7, 0.9, 1.0):
        m = pruning_mask(scores, sparsity)
        kept = sum(int(np.sum(m[k]["kernel"])) for k in kernels)
        assert n - kept == round(sparsity * n)
        assert all(bool(np.all(m[k]["bias"])) for k in kernels)  # biases are never pruned
        if 0 < sparsity < 1:  # every pruned weight scores at most every kept one
            allw = np.concatenate([np.abs(kernels[k]).ravel() for k in kernels])
            allm = np.concatenate([np.asarray(m[k]["kernel"]).ravel() for k in kernels])
            assert allw[~allm].max() <= allw[allm].min()
        m = pruning_mask(scores, sparsity, scope="layer")
        for k, w in kernels.items():
            assert w.size - int(np.sum(m[k]["kernel"])) == round(sparsity * w.size)
    with pytest.raises(ValueError, match="sparsity"):
        pruning_mask(scores, 1.5)
    with pytest.raises(ValueError, match="scope"):
        pruning_mask(scores, 0.5, scope="row")


def test_bit_allocation_respects_the_budget_and_matches_brute_force():
    params, H, _ = _model()
    s = quantization_sensitivity(H, key=KEY, num_matvecs=10_000, top_eigenvalue=False)
    n = np.asarray(s.num_params)
    omega = np.asarray(s.omega)
    for avg in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0):
        g = s.allocate(average_bits=avg)
        e = s.allocate(average_bits=avg, method="exhaustive")
        budget = avg * n.sum()
        for a in (g, e):
            assert a.size_bits <= budget and a.size_bits == int(np.dot(n, a.bits))
            np.testing.assert_allclose(
                a.objective, sum(omega[i, s.bits.index(b)] for i, b in enumerate(a.bits))
            )
        # the brute force here, independently of the library's "exhaustive"
        best = min(
            sum(omega[i, j] for i, j in enumerate(c))
            for c in itertools.product(range(3), repeat=len(n))
            if sum(n[i] * s.bits[j] for i, j in enumerate(c)) <= budget
        )
        np.testing.assert_allclose(e.objective, best)
        assert g.objective >= best - 1e-15  # greedy: a feasible choice, not always optimal
    with pytest.raises(ValueError, match="below the size"):
        s.allocate(average_bits=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        s.allocate(100, average_bits=4)


def test_greedy_allocation_is_optimal_for_equal_sizes_and_convex_costs():
    # Equal layer sizes, unit bit steps and costs convex in the bits (each bit saved costs more
    # than the previous one): the marginal-allocation greedy is optimal (Fox 1966); checked
    # against brute force over every budget.
    rng = np.random.default_rng(4)
    params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(4, 2)))} for i in range(4)}
    curv = np.repeat(rng.uniform(0.1, 10.0, size=4), 8)
    op = hvp.from_dense(np.diag(curv), like=params)
    shrink = lambda w, b: w * (1 - 2.0**-b)  # noqa: E731 - error ||w||^2 4^-b: convex in b
    s = quantization_sensitivity(
        op, key=KEY, bits=(2, 3, 4, 5), quantizer=shrink, top_eigenvalue=False
    )
    assert np.all(np.diff(np.diff(s.omega, axis=1), axis=1) > 0)  # convex in the bits
    for budget in range(8 * 4 * 2, 8 * 4 * 5 + 1, 8):
        best = min(
            sum(s.omega[i, j] for i, j in enumerate(c))
            for c in itertools.product(range(4), repeat=4)
            if sum(8 * s.bits[j] for j in c) <= budget
        )
        np.testing.assert_allclose(s.allocate(budget).objective, best, rtol=1e-12)
    with pytest.raises(ValueError, match="below the size"):
        s.allocate(average_bits=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        s.allocate(100, average_bits=4)


def test_custom_quantizer_and_leaf_filter():
    params, H, dense = _model()
    calls = []

    def halve(w, bits):  # a toy quantiser: error (w/2)^2, independent of bits
        calls.append(bits)
        return w / 2

    s = quantization_sensitivity(
        H,
        key=KEY,
        num_matvecs=10_000,
        top_eigenvalue=False,
        bits=(4,),
        quantizer=halve,
        quantize=lambda path, leaf: path.startswith("out/"),
    )
    assert s.layers == ("out",) and set(calls) == {4}
    w = np.asarray(params["out"]["kernel"])
    b = np.asarray(params["out"]["bias"])
    idx = _block(params, dense, "out")
    idx = np.concatenate([np.arange(idx[0] - b.size, idx[0]), idx])  # out/bias precedes out/kernel
    block = dense[np.ix_(idx, idx)]
    ref = np.trace(block) / (w.size + b.size) * (np.sum(w**2) + np.sum(b**2)) / 4
    np.testing.assert_allclose(s.omega[0, 0], ref, rtol=1e-10)
    with pytest.raises(ValueError, match="No leaf"):
        quantization_sensitivity(H, key=KEY, quantize=lambda p, x: False)
