"""Weighted / masked losses (issue 16 §1) and reverse-mode GGN / empirical Fisher (issue 9 §3).

Every operator is compared with a dense float64 reference built independently:
``jax.hessian`` of the loss written out by hand, ``J^T H_L J`` from explicit
Jacobians (``jax.jacrev``), and ``sum_i (W_i/W) g_i g_i^T`` from the Jacobian of
the per-example losses.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import hvp

V, D, T, N = 6, 3, 5, 4  # vocabulary, width, tokens, sequences


def _tokens():
    rs = np.random.RandomState(0)
    toks = rs.randint(1, V, size=(N, T))
    toks[0, 3:] = 0  # padding
    toks[2, 1:] = 0
    return jnp.asarray(toks)


def _params():
    rs = np.random.RandomState(1)
    return {"emb": jnp.asarray(rs.randn(V, D)), "w": jnp.asarray(rs.randn(D, V))}


def _lm(p, toks):
    """Predicts token t from the tokens before it (inputs shifted right, as lm1b's decoder)."""
    shifted = jnp.pad(toks, ((0, 0), (1, 0)))[:, :-1]
    h = jnp.tanh(p["emb"][shifted])
    return h @ p["w"]


def _masked_ce(logits, targets, weights, smoothing=0.0):
    """The lm1b example's compute_weighted_cross_entropy / weight_sum, written out."""
    c = logits.shape[-1]
    on, off = 1.0 - smoothing, smoothing / (c - 1)
    soft = jax.nn.one_hot(targets, c) * (on - off) + off
    const = 0.0 if smoothing == 0 else -(on * np.log(on) + (c - 1) * off * np.log(off + 1e-20))
    loss = -jnp.sum(soft * jax.nn.log_softmax(logits), -1) - const
    return jnp.sum(loss * weights) / jnp.sum(weights)


def _flat(params):
    return jax.flatten_util.ravel_pytree(params)


def _dense_hessian(params, toks, smoothing=0.0):
    flat, unravel = _flat(params)
    w = (toks > 0).astype(flat.dtype)
    return jax.hessian(lambda f: _masked_ce(_lm(unravel(f), toks), toks, w, smoothing))(flat)


def _dense_ggn(params, toks, smoothing=0.0):
    flat, unravel = _flat(params)
    w = (toks > 0).astype(flat.dtype)
    out = _lm(params, toks)
    jac = jax.jacrev(lambda f: _lm(unravel(f), toks).reshape(-1))(flat)
    h_out = jax.hessian(lambda o: _masked_ce(o.reshape(out.shape), toks, w, smoothing))(
        out.reshape(-1)
    )
    return jac.T @ h_out @ jac


def _dense_fisher(params, toks):
    flat, unravel = _flat(params)
    w = (toks > 0).astype(flat.dtype)

    def losses(f):
        return jax.vmap(lambda t, wi: _masked_ce(_lm(unravel(f), t[None])[0], t, wi))(toks, w)

    jac = jax.jacrev(losses)(flat)
    share = w.sum(1) / w.sum()
    return (jac.T * share) @ jac


def _err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def lm():
    toks, params = _tokens(), _params()
    return toks, params, _dense_hessian(params, toks), _dense_ggn(params, toks)


def test_masked_token_hessian_and_ggn_match_dense_references(lm):
    toks, params, h_ref, g_ref = lm
    loss_fn = hvp.operators.compose(_lm, hvp.losses.softmax_cross_entropy)
    # the lm1b batch {"inputs": tokens}: targets are the tokens, weights the padding mask
    H = hvp.hessian(loss_fn, params, {"inputs": toks})
    assert _err(H.dense(), h_ref) < 1e-12
    # the same with explicit weights, as (inputs, targets, weights) and as a dict key
    w = (toks > 0).astype(jnp.float64)
    G3 = hvp.ggn(_lm, hvp.losses.softmax_cross_entropy, params, (toks, toks, w))
    Gd = hvp.ggn(
        _lm,
        hvp.losses.softmax_cross_entropy,
        params,
        {"inputs": toks, "targets": toks, "weights": w},
    )
    assert _err(G3.dense(), g_ref) < 1e-12
    assert _err(Gd.dense(), g_ref) < 1e-12
    # the unmasked curvature is a clearly different matrix (the fault of issue 16 §1)
    unmasked = hvp.ggn(_lm, hvp.losses.softmax_cross_entropy, params, (toks, toks))
    assert _err(unmasked.dense(), g_ref) > 0.05


def test_weighted_batches_average_by_total_weight_across_batches(lm):
    toks, params, h_ref, g_ref = lm
    # batches with very different numbers of real tokens: averaging by batch size would be wrong
    batches = [{"inputs": toks[:1]}, {"inputs": toks[1:3]}, {"inputs": toks[3:]}]
    loss_fn = hvp.operators.compose(_lm, hvp.losses.softmax_cross_entropy)
    H = hvp.hessian(loss_fn, params, batches)
    assert H.dataset.weighted
    assert _err(H.dense(), h_ref) < 1e-12
    G = hvp.ggn(_lm, hvp.losses.softmax_cross_entropy, params, batches)
    assert _err(G.dense(), g_ref) < 1e-12
    F = hvp.empirical_fisher(loss_fn, params, batches)
    assert _err(F.dense(), _dense_fisher(params, toks)) < 1e-12


def test_label_smoothing_matches_lm1b_formula():
    toks, params = _tokens(), _params()
    loss = hvp.losses.SoftmaxCrossEntropy(label_smoothing=0.1)
    logits = _lm(params, toks)
    w = (toks > 0).astype(jnp.float64)
    assert abs(float(loss(logits, toks, w)) - float(_masked_ce(logits, toks, w, 0.1))) < 1e-12
    H = hvp.hessian(hvp.operators.compose(_lm, loss), params, {"inputs": toks})
    assert _err(H.dense(), _dense_hessian(params, toks, 0.1)) < 1e-12
    G = hvp.ggn(_lm, loss, params, {"inputs": toks})
    assert _err(G.dense(), _dense_ggn(params, toks, 0.1)) < 1e-12
    with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 1\)"):
        hvp.losses.SoftmaxCrossEntropy(label_smoothing=1.0)


def test_weighted_mse_and_per_example_weights():
    rs = np.random.RandomState(2)
    x, y = jnp.asarray(rs.randn(6, 3)), jnp.asarray(rs.randn(6, 2))
    w = jnp.asarray([1.0, 0.0, 2.0, 0.5, 1.0, 3.0])
    p = jnp.asarray(rs.randn(3, 2))

    def ref_loss(q):
        return jnp.sum(w[:, None] * (x @ q - y) ** 2) / (2 * w.sum())  # w broadcast over 2 outputs

    flat, unravel = _flat(p)
    ref = jax.hessian(lambda f: ref_loss(unravel(f)))(flat)
    batches = [(x[:2], y[:2], w[:2]), (x[2:], y[2:], w[2:])]
    G = hvp.ggn(lambda q, a: a @ q, hvp.losses.mean_squared_error, p, batches)
    H = hvp.hessian(
        hvp.operators.compose(lambda q, a: a @ q, hvp.losses.mean_squared_error), p, batches
    )
    assert _err(G.dense(), ref) < 1e-12 and _err(H.dense(), ref) < 1e-12


def test_per_example_weights_with_per_token_labels_match_dense_reference():
    # weights per example (a prefix of the label positions' shape) cover every token of it
    rs = np.random.RandomState(4)
    x = jnp.asarray(rs.randn(4, 3, 2))
    y = jnp.asarray(rs.randint(0, 5, (4, 3)))
    we = jnp.asarray([1.0, 2.0, 0.5, 0.0])
    p = jnp.asarray(rs.randn(2, 5))
    y = y.at[3, 1].set(-100)  # a label at a position of weight 0 is not checked

    def ref_loss(q):
        logits = x @ q
        per_tok = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(y, 0)[..., None], -1)
        return jnp.sum(we[:, None] * per_tok[..., 0]) / (3 * we.sum())

    def loss(q, b):
        return hvp.losses.softmax_cross_entropy(b[0] @ q, b[1], weights=b[2])

    assert abs(float(loss(p, (x, y, we))) - float(ref_loss(p))) < 1e-12
    flat, unravel = _flat(p)
    ref = jax.hessian(lambda f: ref_loss(unravel(f)))(flat)
    H = hvp.hessian(loss, p, (x, y, we))
    G = hvp.ggn(lambda q, a: a @ q, hvp.losses.softmax_cross_entropy, p, (x, y, we))
    assert _err(H.dense(), ref) < 1e-12 and _err(G.dense(), ref) < 1e-12
    with pytest.raises(ValueError, match=r"-100 at \(3, 1\)"):
        hvp.hessian(loss, p, (x, y, we.at[3].set(1.0)))


# --- custom_vjp: a fused layer and a T5X-style cross-entropy --------------------------------


@jax.custom_vjp
def fused_tanh(x):
    return jnp.tanh(x)


def _fused_tanh_fwd(x):
    y = jnp.tanh(x)
    return y, y


def _fused_tanh_bwd(y, g):
    return (g * (1 - y**2),)


fused_tanh.defvjp(_fused_tanh_fwd, _fused_tanh_bwd)


@jax.custom_vjp
def t5x_cross_entropy(logits, targets):
    """Per-position cross-entropy with a hand-written VJP, as T5X's cross_entropy_with_logits."""
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.sum(targets * (logz - logits), axis=-1)


def _xent_fwd(logits, targets):
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    loss = jnp.sum(targets * (logz - logits), axis=-1)
    return loss, (jnp.exp(logits - logz), targets, logz, logits)


def _xent_bwd(res, g):
    probs, targets, logz, logits = res
    g_logits = g[..., None] * (probs * jnp.sum(targets, -1, keepdims=True) - targets)
    return g_logits, g[..., None] * (logz - logits)


t5x_cross_entropy.defvjp(_xent_fwd, _xent_bwd)


def _t5x_loss(logits, labels):
    return jnp.mean(t5x_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1])))


def _mlp(p, x, act=jnp.tanh):
    return act(x @ p["w1"] + p["b1"]) @ p["w2"]


@pytest.fixture(scope="module")
def small():
    rs = np.random.RandomState(3)
    p = {
        "w1": jnp.asarray(rs.randn(3, 4)),
        "b1": jnp.asarray(rs.randn(4)),
        "w2": jnp.asarray(rs.randn(4, 3)),
    }
    x, y = jnp.asarray(rs.randn(7, 3)), jnp.asarray(rs.randint(0, 3, 7))
    flat, unravel = _flat(p)
    jac = jax.jacrev(lambda f: _mlp(unravel(f), x).reshape(-1))(flat)
    out = _mlp(p, x)
    h_out = jax.hessian(
        lambda o: -jnp.mean(jnp.sum(jax.nn.one_hot(y, 3) * jax.nn.log_softmax(o.reshape(7, 3)), -1))
    )(out.reshape(-1))
    per_ex = jax.jacrev(
        lambda f: jax.vmap(lambda a, b: -jax.nn.log_softmax(_mlp(unravel(f), a))[b])(x, y)
    )(flat)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    return p, batches, jac.T @ h_out @ jac, per_ex.T @ per_ex / 7


@pytest.mark.parametrize("layer", ["plain", "custom_vjp"])
@pytest.mark.parametrize("loss", ["builtin", "t5x"])
def test_ggn_and_fisher_forward_and_reverse_match_jacobians(small, layer, loss):
    p, batches, g_ref, f_ref = small
    act = fused_tanh if layer == "custom_vjp" else jnp.tanh

    def model(q, x):
        return _mlp(q, x, act)

    out_loss = _t5x_loss if loss == "t5x" else hvp.losses.softmax_cross_entropy
    loss_fn = hvp.operators.compose(model, out_loss)
    has_custom = layer == "custom_vjp" or loss == "t5x"
    G = hvp.ggn(model, out_loss, p, batches)
    F = hvp.empirical_fisher(loss_fn, p, batches)
    # auto mode falls back to reverse exactly when forward mode is unavailable
    assert G.mode == ("reverse" if layer == "custom_vjp" else "forward")
    assert F.mode == ("reverse" if has_custom else "forward")
    assert _err(G.dense(), g_ref) < 1e-12 and _err(F.dense(), f_ref) < 1e-12
    Gr = hvp.ggn(model, out_loss, p, batches, mode="reverse")
    Fr = hvp.empirical_fisher(loss_fn, p, batches, mode="reverse")
    assert _err(Gr.dense(), g_ref) < 1e-12 and _err(Fr.dense(), f_ref) < 1e-12


def test_forced_forward_mode_on_custom_vjp_fails_and_bad_mode_is_refused(small):
    p, batches, _, _ = small

    def model(q, x):
        return _mlp(q, x, fused_tanh)

    G = hvp.ggn(model, hvp.losses.softmax_cross_entropy, p, batches, mode="forward")
    with pytest.raises(TypeError, match=r'mode="forward".*custom_vjp.*mode="auto".*"reverse"'):
        G @ p
    loss_fn = hvp.operators.compose(model, hvp.losses.softmax_cross_entropy)
    F = hvp.empirical_fisher(loss_fn, p, batches, mode="forward")
    with pytest.raises(TypeError, match=r'custom_vjp.*mode="auto".*mode="reverse"'):
        hvp.linalg.eigsh(F, 1, key=jax.random.key(0))  # inside a compiled algorithm too
    with pytest.raises(ValueError, match=r"`mode` must be one of \('auto', 'forward', 'reverse'\)"):
        hvp.ggn(model, hvp.losses.softmax_cross_entropy, p, batches, mode="backward")
