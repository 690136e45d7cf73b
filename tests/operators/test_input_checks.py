"""Inputs that used to be accepted and give wrong numbers or unrelated errors (issues 9 §5, 12 §1, 18).

Each bad input must raise early, at construction, with a message that names
what is wrong and the fix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import hvp

C = 4


def _model(p, x):
    return x @ p["w"] + p["b"]


@pytest.fixture(scope="module")
def setup():
    rs = np.random.RandomState(0)
    p = {"w": jnp.asarray(rs.randn(3, C)), "b": jnp.zeros(C)}
    x = jnp.asarray(rs.randn(6, 3))
    y = jnp.asarray([0, 1, 2, 3, 1, 0])
    return p, x, y


def _ce_loss(p, batch):
    x, y = batch
    return hvp.losses.softmax_cross_entropy(_model(p, x), y)


def test_labels_outside_the_classes_are_refused_naming_values(setup):
    p, x, y = setup
    # the case: a user lambda with the built-in loss, labels shifted to 1..C
    with pytest.raises(ValueError, match=r"\[0, 4\).*4 at \(3,\).*1-based: subtract 1"):
        hvp.hessian(_ce_loss, p, [(x, y + 1)])
    # labels shifted by more than 1 are not "1-based": no subtract-1 hint
    with pytest.raises(ValueError, match=r"\[0, 4\)") as info:
        hvp.hessian(_ce_loss, p, [(x, y + 5)])
    assert "1-based" not in str(info.value)
    with pytest.raises(ValueError, match=r"\[0, 4\)") as info:
        hvp.hessian(_ce_loss, p, [(x, jnp.asarray([2, 3, 4, 4, 2, 3]))])
    assert "1-based" not in str(info.value)
    # every batch is checked, not only the first (ggn and composed losses)
    bad = [(x[:3], y[:3]), (x[3:], y[3:].at[1].set(-1))]
    with pytest.raises(ValueError, match=r"batch 1.*-1 at \(1,\)"):
        hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, bad)
    loss_fn = hvp.operators.compose(_model, hvp.losses.softmax_cross_entropy)
    with pytest.raises(ValueError, match=r"batch 1.*-1 at \(1,\)"):
        hvp.empirical_fisher(loss_fn, p, bad)
    # masked positions (weight 0) may hold any label, e.g. PyTorch's ignore index -100
    w = jnp.ones(6).at[2].set(0.0)
    op = hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, (x, y.at[2].set(-100), w))
    assert op.size == 16


def test_probability_targets_of_the_wrong_width_or_kind(setup):
    p, x, y = setup
    with pytest.raises(ValueError, match=r"width 4"):
        hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, (x, jax.nn.one_hot(y, 5)))
    with pytest.raises(ValueError, match=r"must be >= 0"):
        hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, (x, -jax.nn.one_hot(y, 4)))
    with pytest.raises(TypeError, match=r"labels must be integers.*astype"):
        hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, (x, y.astype(jnp.float64)))
    # squared error never broadcasts (N, 1) outputs against (N,) targets
    p1 = {"w": p["w"][:, :1], "b": p["b"][:1]}
    with pytest.raises(
        ValueError, match=r"targets have shape \(6,\) but the outputs have \(6, 1\)"
    ):
        hvp.ggn(_model, hvp.losses.mean_squared_error, p1, (x, y.astype(jnp.float64)))


def test_framework_objects_as_params_name_the_adapter_or_field(setup):
    p, x, y = setup
    model = nnx.Linear(3, C, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    with pytest.raises(TypeError, match=r"NNX module.*hvp\.flax\.from_nnx"):
        hvp.hessian(lambda m, b: _ce_loss(m, b), model, (x, y))
    with pytest.raises(TypeError, match=r"nnx\.State.*hvp\.flax\.nnx_params"):
        hvp.hessian(_ce_loss, nnx.state(model), (x, y))
    state = train_state.TrainState.create(apply_fn=_model, params=p, tx=optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"TrainState.*state\.params"):
        hvp.ggn(_model, hvp.losses.softmax_cross_entropy, state, (x, y))
    with pytest.raises(TypeError, match=r"optax optimizer state.*state\.params"):
        hvp.empirical_fisher(_ce_loss, optax.adam(0.1).init(p), (x, y))
    with pytest.raises(TypeError, match=r"TrainState.*state\.params"):
        hvp.hvp(_ce_loss, state, p, (x, y))


def test_batches_of_different_structure_are_refused_naming_the_index(setup):
    p, x, y = setup
    data = [(x[:3], y[:3]), {"x": x[3:], "y": y[3:]}]
    with pytest.raises(ValueError, match=r"Batch 1's structure differs from batch 0's"):
        hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, data)
    w = jnp.ones(3)
    with pytest.raises(ValueError, match=r"Batch 1's structure differs"):
        hvp.hessian(_ce_loss, p, [(x[:3], y[:3], w), (x[3:], y[3:])])


def test_tuple_of_batches_says_to_pass_a_list(setup):
    p, x, y = setup
    # equal batch sizes: the tuple is a valid "batch" until the loss fails inside
    data = ((x[:3], y[:3]), (x[3:], y[3:]))
    for build in (
        lambda: hvp.hessian(_ce_loss, p, data),
        lambda: hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, data),
    ):
        with pytest.raises(ValueError, match=r"tuple of 2 elements.*use a list"):
            build()
    # different batch sizes: caught when the batch is read
    with pytest.raises(ValueError, match=r"tuple of 2 elements.*use a list"):
        hvp.hessian(_ce_loss, p, ((x[:2], y[:2]), (x[2:], y[2:])))
    # the list works
    assert hvp.hessian(_ce_loss, p, list(data)).num_batches == 2


def test_bad_weights_are_refused(setup):
    p, x, y = setup
    with pytest.raises(ValueError, match=r"batch 1 sum to 0.*Drop it"):
        hvp.ggn(
            _model,
            hvp.losses.softmax_cross_entropy,
            p,
            [(x[:3], y[:3], jnp.ones(3)), (x[3:], y[3:], jnp.zeros(3))],
        )
    with pytest.raises(ValueError, match=r"finite and >= 0.*\(1,\): nan"):
        hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, (x, y, jnp.ones(6).at[1].set(jnp.nan)))

    def unweighted_loss(out, t):
        return hvp.losses.softmax_cross_entropy(out, t)

    with pytest.raises(TypeError, match=r"carry weights.*takes `weights`"):
        hvp.ggn(_model, unweighted_loss, p, (x, y, jnp.ones(6)))


def test_lm_batches_and_unpack_messages_name_the_operator_in_use():
    # {"inputs": tokens}: the lm1b convention (targets = tokens, weights = tokens > 0)
    toks = jnp.asarray([[3, 1, 0], [2, 0, 0]])
    x, y, w = hvp.operators.split_batch({"inputs": toks})
    assert y is toks and w.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    # lm1b's packed examples carry keys the model needs: never dropped silently
    packed = {"inputs": toks, "inputs_segmentation": jnp.ones_like(toks)}
    with pytest.raises(hvp.operators.UnpackError, match=r"inputs_segmentation.*only key"):
        hvp.operators.split_batch(packed)
    # float "inputs" alone cannot be an LM batch: the message names the operator (hessian) and
    # where unpack goes, never "hvp.ggn"
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    problem = hvp.flax.from_nnx(model, "cross_entropy")
    batch = {"inputs": jnp.ones((4, 2))}
    with pytest.raises(TypeError, match=r"hessian operator.*hvp\.flax\.from_nnx") as info:
        problem.hessian(batch)
    assert "hvp.ggn" not in str(info.value)
    with pytest.raises(TypeError, match=r"empirical_fisher operator.*hvp\.flax\.from_nnx"):
        problem.empirical_fisher(batch)
    with pytest.raises(TypeError, match=r"Building the ggn operator.*unpack="):
        problem.ggn(batch)


def test_from_matvec_messages_never_say_operator_operator():
    bad = hvp.operators.from_matvec(lambda v: v * jnp.nan, jnp.zeros(3), check_finite=True)
    with pytest.raises(hvp.NonFiniteError) as info:
        bad @ jnp.ones(3)
    assert "operator operator" not in str(info.value)
    assert "the matvec operator" in str(info.value)
    named = hvp.operators.from_matvec(lambda v: v, jnp.zeros(3), name="my operator")
    assert named.label == "the my operator" and named.name == "my"
    assert hvp.operators.from_dense(jnp.eye(2), name="operator").label == "the dense operator"


def test_model_needing_more_arguments_is_not_blamed_on_weights(setup):
    # A model whose call needs more than the inputs (an NNX `__call__(x, rngs)`) fails with
    # "missing 1 required positional argument": the message points to call_kwargs, not to the
    # batch weights, whether or not the batches carry weights.
    p, x, y = setup

    def model_needing_rngs(params, inputs, rngs):
        return _model(params, inputs)

    for batch in [(x, y, jnp.ones(6)), (x, y)]:
        with pytest.raises(TypeError, match=r"call_kwargs=") as info:
            hvp.ggn(model_needing_rngs, hvp.losses.softmax_cross_entropy, p, batch)
        assert "carry weights" not in str(info.value)


def test_a_loss_reading_the_batch_wrongly_names_the_structures_and_signature(setup):
    p, x, y = setup

    def unpacks(q, batch):
        xb, yb = batch
        return hvp.losses.softmax_cross_entropy(_model(q, xb), yb)

    def by_key(q, batch):
        return hvp.losses.softmax_cross_entropy(_model(q, batch["x"]), batch["y"])

    # a bare array where the loss unpacks (inputs, targets): the batch's and params' structure
    with pytest.raises(ValueError, match=r"`loss_fn\(params, batch\)` failed") as info:
        hvp.hessian(unpacks, p, x)
    msg = str(info.value)
    assert "batch: float64[6,3]" in msg and "params: {'b': float64[4], 'w': float64[3,4]}" in msg

    # ... of 2 examples: it would trace (rows as inputs and targets): caught on one more example
    def mse_unpacks(w, batch):
        xb, yb = batch
        return jnp.mean((xb @ w - yb) ** 2)

    with pytest.raises(TypeError, match=r"fails on 3 examples.*bare array.*`x, y = batch`"):
        hvp.hessian(mse_unpacks, jnp.ones(3), x[:2])
    # a tuple where the loss reads dict keys; a parameter the loss reads that is not there
    with pytest.raises(
        TypeError, match=r"batch: \(float64\[1,3\], int\d+\[1\]\) \(its first example"
    ):
        hvp.empirical_fisher(by_key, p, (x, y))
    with pytest.raises(TypeError, match=r"KeyError: 'w'.*\n.*\n  params: \{'b'"):
        hvp.hessian(unpacks, {"b": p["b"]}, (x, y))


def test_nonfinite_data_are_refused_when_built_naming_batch_leaf_and_count(setup, monkeypatch):
    p, x, y = setup
    bad = np.asarray(x).copy()
    bad[4, 1], bad[5, 2] = np.nan, np.inf
    batches = [(x[:3], y[:3]), (jnp.asarray(bad[3:]), y[3:])]
    for stream in (False, True):  # in memory (one reduction per leaf) and streamed (as read)
        with pytest.raises(hvp.operators.NonFiniteError, match=r"batch 1, leaf '0' \(2 of 9"):
            hvp.ggn(_model, hvp.losses.softmax_cross_entropy, p, batches, stream=stream)
    streamed = hvp.operators.ArrayBatches((bad, np.asarray(y)), 2)  # host arrays, batch 2 bad
    with pytest.raises(hvp.operators.NonFiniteError, match=r"batch 2, leaf '0' \(2 of 6"):
        hvp.hessian(_ce_loss, p, streamed, stream=True)
    # check_finite=False builds it anyway (a loss that masks them is the user's business)
    assert hvp.hessian(_ce_loss, p, batches, check_finite=False).size == 16
    # the counts of the compiled path (accelerators) equal NumPy's (CPU memory)
    tree = {"x": jnp.asarray(bad), "y": y, "h": bad.astype(np.float16)}
    assert hvp.tree.nonfinite_counts(tree) == {"h": 2, "x": 2}
    monkeypatch.setattr(hvp.tree._tree, "_on_host", lambda a: False)
    assert hvp.tree.nonfinite_counts(tree) == {"h": 2, "x": 2}
