"""The Monte-Carlo Fisher (``hvp.fisher``) and the losses' ``sample`` / ``sqrt_hessian``.

For softmax cross-entropy and squared error the Fisher equals the GGN in
expectation, so the dense MC Fisher is checked statistically against the dense
float64 GGN of the shared problems (``tests/problems.py``): its squared
Frobenius error must be ``sigma^2 / S`` for ``S`` samples, with ``sigma^2``
measured from independent one-sample Fishers (different keys), within a
tolerance derived from the spread of those measurements.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import build, reference

import hvp
from hvp import losses

#: independent one-sample Fishers used to measure sigma^2 = E ||F_1 - G||_F^2
NUM_KEYS = 8
MC_SAMPLES = 16


def _fisher(p, key, **kwargs):
    return hvp.fisher(
        p.model_fn, p.output_loss, p.params, p.batches, unpack=p.unpack, key=key, **kwargs
    )


@pytest.mark.parametrize(
    "name", ["linear_regression", "dict_batch"]
)  # squared error, cross-entropy
def test_mc_fisher_converges_to_ggn(name):
    p = build(name)
    g = reference(name, "ggn")
    ones = [np.asarray(_fisher(p, jax.random.key(k)).dense()) for k in range(NUM_KEYS)]
    errs = np.array([np.linalg.norm(d - g) ** 2 for d in ones])
    sigma2 = errs.mean()
    # the spread of the squared error, relative to its mean (a conservative bound for S > 1,
    # where the error is closer to Gaussian), plus the uncertainty of sigma2 itself
    tol = 4.0 * errs.std(ddof=1) / sigma2 * np.sqrt(1.0 + 1.0 / NUM_KEYS)
    assert tol < 1.0  # the test can fail: a biased or mis-scaled Fisher breaks the ratio
    F = _fisher(p, jax.random.key(100), mc_samples=MC_SAMPLES)
    dense = np.asarray(F.dense())
    ratio = np.linalg.norm(dense - g) ** 2 / (sigma2 / MC_SAMPLES)
    assert abs(ratio - 1.0) <= tol, (ratio, tol)
    # the relative error falls like 1/sqrt(S): measured 0.34 (S = 1) -> 0.07-0.08 (S = 16)
    assert np.linalg.norm(dense - g) < 0.5 * np.sqrt(sigma2)
    # PSD by construction, and flagged so
    assert F.psd and F.kind == "fisher"
    assert np.linalg.eigvalsh(dense).min() >= -1e-12 * np.abs(g).max()
    np.testing.assert_allclose(dense, dense.T, atol=1e-14)


def test_deterministic_for_a_key_and_errors():
    p = build("linear_regression")
    a = _fisher(p, jax.random.key(3)).dense()
    np.testing.assert_array_equal(a, _fisher(p, jax.random.key(3)).dense())
    np.testing.assert_array_equal(a, _fisher(p, jax.random.PRNGKey(3)).dense())  # old-style key
    assert not np.allclose(a, _fisher(p, jax.random.key(4)).dense())
    with pytest.raises(TypeError, match="key"):
        _fisher(p, 0)
    with pytest.raises(TypeError, match="key"):
        hvp.fisher(p.model_fn, p.output_loss, p.params, p.batches)
    with pytest.raises(ValueError, match="mc_samples"):
        _fisher(p, jax.random.key(0), mc_samples=0)
    q = build("logistic_regression")  # a user-supplied output loss without `sample`
    with pytest.raises(TypeError, match=r"`sample` or `fisher_output_hvp`.*sample\(outputs, key"):
        _fisher(q, jax.random.key(0))


def test_fisher_under_jit_matches():
    p = build("linear_regression")
    key = jax.random.key(5)
    v = jax.tree_util.tree_map(jnp.ones_like, p.params)
    outside = _fisher(p, key, mc_samples=2).mv(v)

    @jax.jit
    def inside(params):
        F = hvp.fisher(p.model_fn, p.output_loss, params, p.batches, key=key, mc_samples=2)
        return (F + 0.5).mv(v)

    got = inside(p.params)
    jax.tree_util.tree_map(
        lambda a, b, x: np.testing.assert_allclose(a, b + 0.5 * x, rtol=1e-12), got, outside, v
    )


def _per_position_check(loss, outputs, samples, u, weights, event_axes):
    """``fisher_output_hvp`` against autodiff of the loss itself: ``sum_i G_i (G_i . u_i) / c_i``.

    ``G_s = grad_z loss(z, t_s, w)`` holds ``c_i g_is`` at position ``i``.
    """
    grads = jax.jit(jax.vmap(jax.grad(lambda z, t: loss(z, t, weights))))(
        jnp.broadcast_to(outputs, (samples.shape[0],) + outputs.shape), samples
    )
    c = loss._position_weights(outputs, weights)
    dots = jnp.sum(grads * u, axis=event_axes, keepdims=True)
    safe = jnp.where(c > 0, c, 1.0)
    expect = jnp.where(c > 0, jnp.mean(grads * dots, axis=0) / safe, 0.0)
    got = loss.fisher_output_hvp(outputs, samples, u, weights)
    np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-14)


def test_output_fisher_matches_autodiff_of_the_loss_with_weights():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 4)))
    weights = jnp.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])  # per token, with padding
    u = jnp.asarray(rng.normal(size=logits.shape))
    labels = losses.softmax_cross_entropy.sample(logits, jax.random.key(0), 5)
    assert labels.shape == (5, 2, 3) and labels.dtype == jnp.int32
    _per_position_check(losses.softmax_cross_entropy, logits, labels, u, weights, -1)
    out = jnp.asarray(rng.normal(size=(3, 2)))
    targets = losses.mean_squared_error.sample(out, jax.random.key(1), 5)
    assert targets.shape == (5, 3, 2)
    u = jnp.asarray(rng.normal(size=out.shape))
    _per_position_check(losses.mean_squared_error, out, targets, u, jnp.array([1.0, 0.0, 3.0]), ())


@pytest.mark.parametrize("loss", [losses.softmax_cross_entropy, losses.mean_squared_error])
def test_sampling_scale_matches_the_output_hessian(loss):
    """E_y[g g^T] = output Hessian: a large sample average against ``jax.hessian`` of the loss.

    The tolerance is 5 standard errors of each entry, measured from the per-sample terms.
    """
    rng = np.random.default_rng(1)
    out = jnp.asarray(rng.normal(size=(2, 3)))
    targets = jnp.array([0, 2]) if loss is losses.softmax_cross_entropy else out
    num = 4_000
    samples = loss.sample(out, jax.random.key(2), num)
    hess = np.asarray(jax.jit(jax.hessian(lambda z: loss(z, targets)))(out))
    hess = hess.reshape(out.size, out.size)
    basis = jnp.eye(out.size).reshape((out.size,) + out.shape)
    # per-sample output Fisher matrices (num, n, n)
    terms = jax.vmap(lambda t: jax.vmap(lambda e: loss.fisher_output_hvp(out, t[None], e))(basis))(
        samples
    )
    terms = np.asarray(terms).reshape(num, out.size, out.size)
    mean = terms.mean(axis=0)
    full = jax.jit(jax.vmap(lambda e: loss.fisher_output_hvp(out, samples, e)))(basis)
    np.testing.assert_allclose(
        mean, np.asarray(full).reshape(out.size, out.size), rtol=1e-10, atol=1e-14
    )
    se = terms.std(axis=0, ddof=1) / np.sqrt(num)
    assert np.all(np.abs(mean - hess) <= 5 * se + 1e-14), np.max(
        np.abs(mean - hess) / (se + 1e-300)
    )
    # and the tolerance is tight enough to see a wrong scale (e.g. variance 1 instead of 1/2)
    assert np.all(5 * se <= 0.5 * np.abs(hess) + 1e-14)


def test_sqrt_hessian():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, 4)))
    w = jnp.array([1.0, 0.0, 2.0])
    hess = jax.jit(jax.hessian(lambda z: losses.softmax_cross_entropy(z, jnp.array([0, 1, 3]), w)))(
        logits
    )
    s = jax.jit(losses.softmax_cross_entropy.sqrt_hessian)(logits, jnp.array([0, 1, 3]), w)
    assert s.shape == (3, 4, 4)
    ss = jnp.einsum("iab,icb->iac", s, s)
    for i in range(3):
        np.testing.assert_allclose(ss[i], hess[i, :, i, :], atol=1e-14)
    out = jnp.asarray(rng.normal(size=(3, 2)))
    hess = jax.jit(jax.hessian(lambda z: losses.mean_squared_error(z, out * 0, w)))(out)
    d = losses.mean_squared_error.sqrt_hessian(out, out * 0, w)
    np.testing.assert_allclose(np.diag((d**2).ravel()), np.asarray(hess).reshape(6, 6), atol=1e-14)


def test_flax_adapter_fisher():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    problem = hvp.flax.from_nnx(model, "cross_entropy")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    data = (x, jnp.array([0, 1, 2, 3, 0, 1]))
    key = jax.random.key(0)
    F = problem.operator("fisher", data, key=key, mc_samples=2)
    ref = hvp.fisher(
        problem.model_fn, problem.output_loss, problem.params, data, key=key, mc_samples=2
    )
    assert F.kind == "fisher" and F.psd
    np.testing.assert_array_equal(F.dense(), ref.dense())
    assert problem.operator("ggn", data, state=problem.state).psd
    assert not problem.operator("hessian", data, state=problem.state).psd
    with pytest.raises(ValueError, match="with_state"):
        problem.operator("fisher", data, key=key, state=problem.state)


def test_weighted_batches_and_parameter_block():
    """Weights (padding-style zeros included) and ``wrt`` pass through: E[F] is the weighted GGN."""
    p = build("linear_regression")
    rng = np.random.default_rng(0)
    data = [(x, y, jnp.asarray(rng.choice([0.0, 1.0, 5.0], size=len(y)))) for x, y in p.batches]
    for wrt in ("w",):  # a parameter block (the full-parameter path is tested above)
        g = hvp.ggn(p.model_fn, p.output_loss, p.params, data, wrt=wrt).dense()
        unweighted = hvp.ggn(p.model_fn, p.output_loss, p.params, p.batches, wrt=wrt).dense()
        F = hvp.fisher(
            p.model_fn, p.output_loss, p.params, data, key=jax.random.key(7), mc_samples=64, wrt=wrt
        )
        err = np.linalg.norm(F.dense() - g) / np.linalg.norm(g)
        # measured 0.065 (the weights raise the Monte-Carlo variance); ignoring the weights would
        # be off by the difference to the unweighted GGN (measured 0.25)
        assert err < 0.1, err
        assert np.linalg.norm(unweighted - g) / np.linalg.norm(g) > 2 * err


class _Loader:
    """A re-iterable loader of host batches that counts its passes."""

    def __init__(self, batches):
        self.batches = [jax.tree_util.tree_map(np.asarray, b) for b in batches]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_streamed_fisher_equals_the_in_memory_fisher():
    """A streamed data set: the labels are redrawn per batch with the in-memory keys, every pass."""
    key = jax.random.key(11)
    # Gaussian targets: weighted batches (zeros included), a parameter block, the ragged batch in
    # the middle (the in-memory batch order, by shape group, is then 0, 2, 3, 1)
    p = build("linear_regression")
    rng = np.random.default_rng(1)
    batches = [(x, y, rng.choice([0.0, 1.0, 3.0], size=len(y))) for x, y in p.batches]
    batches = [batches[0], batches[3], batches[1], batches[2]]

    def fisher(data, k=key, **kw):
        return hvp.fisher(
            p.model_fn, p.output_loss, p.params, data, key=k, mc_samples=3, wrt="w", **kw
        )

    mem = np.asarray(fisher(batches).dense())
    loader = _Loader(batches)
    st = fisher(loader, stream=True)
    assert st.streaming and st.kind == "fisher" and st.psd
    assert st.dataset.in_memory_index() == (0, 3, 1, 2)
    dense = np.asarray(st.dense())
    assert np.linalg.norm(dense - mem) <= 1e-12 * np.linalg.norm(mem)
    np.testing.assert_array_equal(np.asarray(st.dense()), dense)  # the same matrix every pass
    assert loader.passes == 3  # building + two dense() blocks
    v = hvp.tree.normal_like(key, st.params)
    assert fisher(_Loader(batches), stream_budget=1).streaming  # "auto" above the budget
    other = fisher(loader, k=jax.random.key(12), stream=True)  # another key, another matrix
    assert not np.allclose(hvp.tree.ravel(other.mv(v)), dense @ hvp.tree.ravel(v))
    # categorical labels (softmax cross-entropy): a small softmax regression, 3 batches
    rng = np.random.default_rng(2)
    cat = [(rng.normal(size=(n, 3)), rng.integers(0, 4, size=n)) for n in (5, 5, 3)]
    w0 = {"w": 0.5 * rng.normal(size=(3, 4)), "b": np.zeros(4)}

    def model(q, x):
        return x @ q["w"] + q["b"]

    a, b = (
        np.asarray(
            hvp.fisher(
                model, losses.softmax_cross_entropy, w0, d, key=key, mc_samples=2, stream=s
            ).dense()
        )
        for d, s in ((cat, False), (_Loader(cat), True))
    )
    assert np.linalg.norm(a - b) <= 1e-12 * np.linalg.norm(a) and np.linalg.norm(a) > 0


@pytest.mark.slow  # the operator is checked against the in-memory one (dense, bitwise per pass) above
def test_eigsh_on_a_streamed_fisher():
    """A Krylov method sees one fixed operator: eigsh converges to the in-memory top eigenvalue."""
    p, key = build("linear_regression"), jax.random.key(11)
    mem, st = (
        hvp.fisher(p.model_fn, p.output_loss, p.params, d, key=key, mc_samples=3, stream=s)
        for d, s in ((p.batches, False), (_Loader(p.batches), True))
    )
    r = hvp.eigsh(st, 1, key=key, num_iters=12)
    assert bool(np.all(r.converged))
    top = np.linalg.eigvalsh(np.asarray(mem.dense()))[-1]
    np.testing.assert_allclose(float(r.eigenvalues[0]), top, rtol=1e-10)
