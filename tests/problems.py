"""Shared, deterministic test problems with dense float64 references.

Every builder takes ``dtype`` (``jnp.float64`` by default, ``jnp.float32``
possible) and returns a frozen :class:`Problem`. All randomness uses fixed
NumPy seeds, so a builder returns the same arrays on every call. Each problem
has several batches, the last one of a different size (so data-set weighting
is exercised), and the loss is a **mean** over the examples of a batch
(``reduction="mean"``).

Usage::

    from problems import ALL_PROBLEMS, GGN_PROBLEMS, dense_hessian, dense_ggn, dense_fisher

    prob = ALL_PROBLEMS["mlp"]()                      # float64
    H = hvp.hessian(prob.loss_fn, prob.params, prob.batches)
    ref = dense_hessian(prob)                         # (n, n) float64, ravel order

Problems (``name``: parameters, ``n``):

* ``quadratic``: ``mean_i [0.5 c_i x^T A x + b_i^T x]`` with ``A`` symmetric
  indefinite and weights ``c_i > 0``; known Hessian ``mean(c) A``
  (``problem.hessian``). No model (``model_fn is None``): no GGN. n = 12.
* ``linear_regression``: ``x @ w + b`` with 2 outputs, mean squared error
  (closed-form ``output_hvp``). n = 12.
* ``logistic_regression``: binary logistic regression on pooled digits
  features with a custom output loss **without** ``output_hvp`` (the generic
  GGN path). n = 17.
* ``mlp``: tanh MLP 16-12-10 on 2x2-pooled scikit-learn digits, softmax
  cross-entropy; indefinite Hessian. n = 334.
* ``cnn``: 3x3 conv (4 channels, ``lax.conv_general_dilated``) + tanh + 2x2
  average pool + dense, on 8x8 digits, softmax cross-entropy. n = 410.
* ``dict_batch``: softmax regression whose batch is ``{"image", "label"}``
  (the default ``unpack`` handles it). n = 170.
* ``nested``: parameters as a nested dict of lists/tuples with a ``(1,)``
  scale, vectors and matrices; a small tanh net with squared error. n = 30.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import hvp
from hvp import tree as tu

__all__ = [
    "Problem",
    "ALL_PROBLEMS",
    "GGN_PROBLEMS",
    "build",
    "quadratic",
    "linear_regression",
    "logistic_regression",
    "mlp",
    "cnn",
    "dict_batch",
    "nested",
    "concat_batches",
    "to_float64",
    "dense_hessian",
    "dense_ggn",
    "dense_fisher",
    "digits",
    "KINDS",
    "reference",
    "make_operator",
    "operator",
    "relative_error",
]

#: batch sizes: three equal batches (stacked into one ``lax.scan``) + a smaller last batch.
BATCH_SIZES = (24, 24, 24, 13)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A test problem.

    Attributes:
      name: key in :data:`ALL_PROBLEMS`.
      params: parameter pytree (floating leaves of ``dtype``).
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch.
      batches: list of batches; the last one is smaller than the others.
      model_fn: ``model_fn(params, inputs) -> outputs`` or ``None`` (no GGN).
      output_loss: ``output_loss(outputs, targets) -> scalar`` (mean over examples),
        convex in the outputs for every problem here; ``None`` without a model.
      unpack: ``batch -> (inputs, targets)``; ``None`` means
        :func:`hvp.operators.default_unpack` works.
      hessian: a known dense Hessian (ravel order) or ``None``.
      dtype: the floating dtype of the parameters and inputs.
    """

    name: str
    params: Any
    loss_fn: Callable
    batches: list
    model_fn: Callable | None = None
    output_loss: Callable | None = None
    unpack: Callable | None = None
    hessian: Any = None
    dtype: Any = jnp.float64

    @property
    def size(self) -> int:
        return tu.size(self.params)

    @property
    def num_examples(self) -> int:
        return sum(int(jax.tree_util.tree_leaves(b)[0].shape[0]) for b in self.batches)

    @property
    def data(self):
        """All batches concatenated into one batch."""
        return concat_batches(self.batches)

    def unpack_fn(self) -> Callable:
        return hvp.operators.default_unpack if self.unpack is None else self.unpack


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@functools.cache
def _digits_np():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = d.target.astype(np.int32)
    return images, labels


def digits(num: int = sum(BATCH_SIZES), *, pooled: bool = True, seed: int = 0):
    """``num`` scikit-learn digits (fixed random subset): ``(features, labels)`` as NumPy arrays.

    ``pooled=True`` gives 2x2-average-pooled, centred 16-dim features; otherwise
    centred 8x8x1 images (NHWC).
    """
    images, labels = _digits_np()
    idx = np.random.default_rng(seed).permutation(len(labels))[:num]
    x, y = images[idx], labels[idx]
    if pooled:
        x = x.reshape(num, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(num, 16)
    else:
        x = x[..., None]
    return x - 0.5, y


def _split(arrays, sizes=BATCH_SIZES):
    """Split a tuple of arrays with a common leading axis into batches of ``sizes``."""
    out, start = [], 0
    for s in sizes:
        out.append(tuple(a[start : start + s] for a in arrays))
        start += s
    return out


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: (
            jnp.asarray(a, dtype)
            if np.issubdtype(np.asarray(a).dtype, np.floating)
            else jnp.asarray(a)
        ),
        tree,
    )


def _loss_from_model(model_fn, output_loss, unpack=None):
    unpack = hvp.operators.default_unpack if unpack is None else unpack

    def loss_fn(params, batch):
        x, y = unpack(batch)
        return output_loss(model_fn(params, x), y)

    return loss_fn


def _glorot(rng, fan_in, fan_out, shape=None):
    shape = (fan_in, fan_out) if shape is None else shape
    return rng.normal(size=shape) * np.sqrt(2.0 / (fan_in + fan_out))


# --------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------
def quadratic(dtype=jnp.float64, *, n: int = 12) -> Problem:
    """``loss = mean_i [0.5 c_i x^T A x + b_i^T x]``; Hessian ``mean(c) A`` (indefinite)."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigs = np.linspace(-2.0, 3.0, n)
    a = (q * eigs) @ q.T
    a = 0.5 * (a + a.T)
    num = sum(BATCH_SIZES)
    c = rng.uniform(0.5, 1.5, size=num)
    b = rng.normal(size=(num, n))
    params = {"x": rng.normal(size=(n,))}
    a_j = jnp.asarray(a, dtype)

    def loss_fn(params, batch):
        cw, bw = batch
        x = params["x"]
        return jnp.mean(0.5 * cw * (x @ a_j @ x) + bw @ x)

    batches = [_cast(bt, dtype) for bt in _split((c, b))]
    return Problem(
        "quadratic", _cast(params, dtype), loss_fn, batches, hessian=np.mean(c) * a, dtype=dtype
    )


def linear_regression(dtype=jnp.float64) -> Problem:
    """``x @ w + b`` (5 inputs, 2 outputs) with mean squared error."""
    rng = np.random.default_rng(2)
    num = sum(BATCH_SIZES)
    x = rng.normal(size=(num, 5))
    w_true = rng.normal(size=(5, 2))
    y = x @ w_true + 0.1 * rng.normal(size=(num, 2))
    params = {"w": 0.3 * rng.normal(size=(5, 2)), "b": np.zeros(2)}

    def model_fn(params, x):
        return x @ params["w"] + params["b"]

    loss = hvp.losses.mean_squared_error
    batches = [_cast(bt, dtype) for bt in _split((x, y))]
    return Problem(
        "linear_regression",
        _cast(params, dtype),
        _loss_from_model(model_fn, loss),
        batches,
        model_fn=model_fn,
        output_loss=loss,
        dtype=dtype,
    )


class BinaryLogisticLoss:
    """Mean binary logistic loss ``mean(softplus(z) - y z)`` of logits ``z`` and labels ``y`` in {0, 1}.

    Deliberately has no ``output_hvp``: :func:`hvp.ggn` must differentiate it twice.
    """

    def __call__(self, logits, labels):
        return jnp.mean(jax.nn.softplus(logits) - labels.astype(logits.dtype) * logits)


def logistic_regression(dtype=jnp.float64) -> Problem:
    """Binary logistic regression (digit < 5) on 16 pooled digits features."""
    rng = np.random.default_rng(3)
    x, labels = digits(seed=3)
    y = (labels < 5).astype(np.int32)
    params = {"w": 0.5 * rng.normal(size=(16,)), "b": np.full((1,), 0.1)}

    def model_fn(params, x):
        return x @ params["w"] + params["b"][0]

    loss = BinaryLogisticLoss()
    batches = [_cast(bt, dtype) for bt in _split((x, y))]
    return Problem(
        "logistic_regression",
        _cast(params, dtype),
        _loss_from_model(model_fn, loss),
        batches,
        model_fn=model_fn,
        output_loss=loss,
        dtype=dtype,
    )


def _mlp_params(rng, sizes):
    return {
        f"dense{i}": {"w": _glorot(rng, m, k) * 1.5, "b": 0.1 * rng.normal(size=(k,))}
        for i, (m, k) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def mlp_apply(params, x):
    """tanh MLP: ``dense0 -> tanh -> dense1 -> ... -> logits``."""
    layers = [params[k] for k in sorted(params)]
    h = x
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return h


def mlp(dtype=jnp.float64) -> Problem:
    """tanh MLP 16-12-10 on pooled digits with softmax cross-entropy (n = 334; indefinite Hessian)."""
    rng = np.random.default_rng(4)
    x, y = digits(seed=4)
    params = _mlp_params(rng, (16, 12, 10))
    loss = hvp.losses.softmax_cross_entropy
    batches = [_cast(bt, dtype) for bt in _split((x, y))]
    return Problem(
        "mlp",
        _cast(params, dtype),
        _loss_from_model(mlp_apply, loss),
        batches,
        model_fn=mlp_apply,
        output_loss=loss,
        dtype=dtype,
    )


def cnn_apply(params, x):
    """conv 3x3 (VALID, NHWC) -> tanh -> 2x2 average pool -> flatten -> dense."""
    h = lax.conv_general_dilated(
        x,
        params["conv"]["kernel"],
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    h = jnp.tanh(h + params["conv"]["bias"])  # (n, 6, 6, 4)
    n = h.shape[0]
    h = h.reshape(n, 3, 2, 3, 2, h.shape[-1]).mean(axis=(2, 4)).reshape(n, -1)  # (n, 36)
    return h @ params["dense"]["kernel"] + params["dense"]["bias"]


def cnn(dtype=jnp.float64) -> Problem:
    """A small CNN on 8x8x1 digits (n = 36 + 4 + 360 + 10 = 410), softmax cross-entropy."""
    rng = np.random.default_rng(5)
    x, y = digits(pooled=False, seed=5)
    params = {
        "conv": {
            "kernel": rng.normal(size=(3, 3, 1, 4)) * 0.6,
            "bias": 0.1 * rng.normal(size=(4,)),
        },
        "dense": {"kernel": _glorot(rng, 36, 10) * 2.0, "bias": np.zeros(10)},
    }
    loss = hvp.losses.softmax_cross_entropy
    batches = [_cast(bt, dtype) for bt in _split((x, y))]
    return Problem(
        "cnn",
        _cast(params, dtype),
        _loss_from_model(cnn_apply, loss),
        batches,
        model_fn=cnn_apply,
        output_loss=loss,
        dtype=dtype,
    )


def dict_batch(dtype=jnp.float64) -> Problem:
    """Softmax regression whose batches are dicts ``{"image": (n, 16), "label": (n,)}`` (n = 170)."""
    rng = np.random.default_rng(6)
    x, y = digits(seed=6)
    params = {"kernel": 0.5 * rng.normal(size=(16, 10)), "bias": 0.1 * rng.normal(size=(10,))}

    def model_fn(params, image):
        return image @ params["kernel"] + params["bias"]

    loss = hvp.losses.softmax_cross_entropy
    batches = [_cast({"image": xi, "label": yi}, dtype) for xi, yi in _split((x, y))]
    return Problem(
        "dict_batch",
        _cast(params, dtype),
        _loss_from_model(model_fn, loss),
        batches,
        model_fn=model_fn,
        output_loss=loss,
        dtype=dtype,
    )


def nested(dtype=jnp.float64) -> Problem:
    """Parameters as a nested dict of lists and tuples with mixed shapes (n = 30).

    ``{"layers": [{"w": (3, 4), "b": (4,)}, ((4, 2), (2,))], "scale": (1,), "extra": ((1,), (2, 1))}``,
    the model ``scale * (tanh(x w + b) W2 + c) + shift + x[:, :2] proj`` with squared error.
    """
    rng = np.random.default_rng(7)
    num = sum(BATCH_SIZES)
    x = rng.normal(size=(num, 3))
    y = np.stack([np.sin(x[:, 0]) + x[:, 1], np.cos(x[:, 2])], axis=1) + 0.05 * rng.normal(
        size=(num, 2)
    )
    params = {
        "layers": [
            {"w": rng.normal(size=(3, 4)) * 0.8, "b": 0.1 * rng.normal(size=(4,))},
            (rng.normal(size=(4, 2)) * 0.7, 0.1 * rng.normal(size=(2,))),
        ],
        "scale": np.array([1.3]),
        "extra": (np.array([0.2]), 0.3 * rng.normal(size=(2, 1))),
    }

    def model_fn(params, x):
        first, (w2, c) = params["layers"]
        shift, proj = params["extra"]
        h = jnp.tanh(x @ first["w"] + first["b"])
        return params["scale"][0] * (h @ w2 + c) + shift[0] + x[:, :2] @ proj

    loss = hvp.losses.mean_squared_error
    batches = [_cast(bt, dtype) for bt in _split((x, y))]
    return Problem(
        "nested",
        _cast(params, dtype),
        _loss_from_model(model_fn, loss),
        batches,
        model_fn=model_fn,
        output_loss=loss,
        dtype=dtype,
    )


#: every problem, name -> builder(dtype=jnp.float64)
ALL_PROBLEMS: dict[str, Callable[..., Problem]] = {
    "quadratic": quadratic,
    "linear_regression": linear_regression,
    "logistic_regression": logistic_regression,
    "mlp": mlp,
    "cnn": cnn,
    "dict_batch": dict_batch,
    "nested": nested,
}

#: the problems with a model and an output loss (GGN defined)
GGN_PROBLEMS = tuple(k for k in ALL_PROBLEMS if k != "quadratic")


@functools.cache
def build(name: str, dtype: str = "float64") -> Problem:
    """Cached ``ALL_PROBLEMS[name](dtype)`` (``dtype`` given by name so that it hashes)."""
    return ALL_PROBLEMS[name](jnp.dtype(dtype))


# --------------------------------------------------------------------------------------------
# dense float64 references (ravel order of hvp.tree.ravel)
# --------------------------------------------------------------------------------------------
def concat_batches(batches):
    """One batch holding the examples of all ``batches`` in order."""
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *batches)


def to_float64(tree):
    """Cast the floating leaves of ``tree`` to float64 (integer leaves unchanged)."""
    return jax.tree_util.tree_map(
        lambda a: (
            jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a
        ),
        tree,
    )


def _require_x64():
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "Dense references need float64: enable jax_enable_x64 (tests/conftest.py does)."
        )


def _flat_problem(problem: Problem):
    _require_x64()
    params = to_float64(problem.params)
    data = to_float64(problem.data)
    return params, data, tu.ravel(params), tu.unravel_fn(params)


def dense_hessian(problem: Problem) -> np.ndarray:
    """Float64 Hessian of the mean loss over all examples, by ``jax.hessian`` on raveled params."""
    _, data, flat, unravel = _flat_problem(problem)
    h = jax.jit(jax.hessian(lambda f, d: problem.loss_fn(unravel(f), d)))(flat, data)
    return np.asarray(h)


def dense_ggn(problem: Problem) -> np.ndarray:
    """Float64 GGN ``J^T H_out J`` from explicit Jacobians, one example at a time.

    For each example ``i`` (a batch of one), ``J_i`` is the Jacobian of the raveled
    model outputs with respect to the raveled parameters (``jax.jacobian``) and
    ``H_i`` the Hessian of ``output_loss`` at the outputs (``jax.hessian``, no
    closed form). The output losses are means over examples, so the GGN of the
    mean loss over the ``N`` examples is ``(1/N) sum_i J_i^T H_i J_i``.
    """
    if problem.model_fn is None:
        raise ValueError(f"Problem {problem.name!r} has no model: its GGN is not defined.")
    _, data, flat, unravel = _flat_problem(problem)
    x, y = problem.unpack_fn()(data)

    def one(xi, yi):
        xi = jax.tree_util.tree_map(lambda a: a[None], xi)
        yi = jax.tree_util.tree_map(lambda a: a[None], yi)
        out = problem.model_fn(unravel(flat), xi)
        out_flat = tu.ravel(out)
        unravel_out = tu.unravel_fn(out)
        jac = jax.jacobian(lambda f: tu.ravel(problem.model_fn(unravel(f), xi)))(flat)
        h_out = jax.hessian(lambda o: problem.output_loss(unravel_out(o), yi))(out_flat)
        return jac.T @ h_out @ jac

    per_example = jax.jit(jax.vmap(one))(x, y)
    return np.asarray(jnp.mean(per_example, axis=0))


def dense_fisher(problem: Problem) -> np.ndarray:
    """Float64 empirical Fisher ``(1/N) sum_i g_i g_i^T`` from explicit per-example gradients.

    ``g_i`` is the gradient of ``loss_fn`` on the batch holding example ``i`` alone.
    """
    _, data, flat, unravel = _flat_problem(problem)

    def grad_one(ex):
        ex = jax.tree_util.tree_map(lambda a: a[None], ex)
        return jax.grad(lambda f: problem.loss_fn(unravel(f), ex))(flat)

    g = jax.jit(jax.vmap(grad_one))(data)  # (N, n)
    return np.asarray(g.T @ g / g.shape[0])


# --------------------------------------------------------------------------------------------
# cached references and operators (shared by tests; each is computed once per session)
# --------------------------------------------------------------------------------------------
KINDS = ("hessian", "hessian_linearized", "ggn", "empirical_fisher")


@functools.cache
def reference(name: str, kind: str, dtype: str = "float64") -> np.ndarray:
    """Cached dense float64 reference of ``kind`` for problem ``name`` (data of ``dtype``)."""
    p = build(name, dtype)
    if kind in ("hessian", "hessian_linearized"):
        return dense_hessian(p)
    if kind == "ggn":
        return dense_ggn(p)
    if kind == "empirical_fisher":
        return dense_fisher(p)
    raise ValueError(f"Unknown kind {kind!r}; expected one of {KINDS}.")


def make_operator(problem: Problem, kind: str, data=None, **kwargs):
    """The ``hvp`` operator of ``kind`` for ``problem`` over ``data`` (default: its batches)."""
    data = problem.batches if data is None else data
    if kind == "hessian":
        return hvp.hessian(problem.loss_fn, problem.params, data, **kwargs)
    if kind == "hessian_linearized":
        return hvp.hessian(problem.loss_fn, problem.params, data, linearize=True, **kwargs)
    if kind == "ggn":
        return hvp.ggn(
            problem.model_fn,
            problem.output_loss,
            problem.params,
            data,
            unpack=problem.unpack,
            **kwargs,
        )
    if kind == "empirical_fisher":
        return hvp.empirical_fisher(problem.loss_fn, problem.params, data, **kwargs)
    raise ValueError(f"Unknown kind {kind!r}; expected one of {KINDS}.")


@functools.cache
def operator(name: str, kind: str, dtype: str = "float64"):
    """Cached :func:`make_operator` over the problem's batches (compiled functions are reused)."""
    return make_operator(build(name, dtype), kind)


def layered_params():
    """A small parameter pytree with four layers (dicts, a list, a lone array; 22 entries).

    ``Dense_0`` (``kernel`` (4, 3), ``bias`` (3,)), ``blocks`` (``[{"w": (3, 2)}, {"w": (2,)}]``)
    and ``scale`` (1,), float64 normal entries (seed 0): the layer helpers' test tree.
    """
    rng = np.random.default_rng(0)
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3))),
            "bias": jnp.asarray(rng.normal(size=(3,))),
        },
        "blocks": [
            {"w": jnp.asarray(rng.normal(size=(3, 2)))},
            {"w": jnp.asarray(rng.normal(size=(2,)))},
        ],
        "scale": jnp.asarray(rng.normal(size=(1,))),
    }


def random_symmetric(n, seed=0):
    """A random symmetric ``(n, n)`` float64 matrix with a diagonal shift in [1, 5]."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    return (a + a.T) / 2 + np.diag(rng.uniform(1, 5, size=n))


def relative_error(a, b) -> float:
    """``||a - b||_F / ||b||_F`` in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


def sym(eigs, seed=0):
    """``Q diag(eigs) Q^T`` for a random orthogonal ``Q`` (a matrix with a prescribed spectrum)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
    a = (q * np.asarray(eigs)) @ q.T
    return (a + a.T) / 2
