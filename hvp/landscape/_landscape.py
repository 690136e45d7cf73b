r"""Loss landscapes: 1-D and 2-D slices of the data-set loss around the parameters.

The slice through :math:`\theta` along directions :math:`d_1` (and :math:`d_2`) is

.. math::

   f(a) = L(\theta + a\, d_1), \qquad f(a, b) = L(\theta + a\, d_1 + b\, d_2),

with :math:`L` the data-set loss of a curvature operator (the same batches and exact batch
weights as its products, :func:`hvp.operators.data_loss`). Directions:

* ``"eigen"``: the top eigenvectors of the operator (:func:`hvp.eigsh`, algebraically largest,
  unit norm). The slice along an eigenvector carries the second-order model
  :math:`L + a\, g^\top d + \tfrac12 \lambda a^2` (:math:`g` the gradient over the data set,
  :math:`\lambda` the Ritz value): it agrees with the loss to :math:`O(a^3)` near 0 when the
  operator is the Hessian, a check that the curvature is right.
* ``"random"``: filter-normalised Gaussian directions (Li, Xu, Taylor, Studer & Goldstein,
  2018, "Visualizing the loss landscape of neural nets", sec. 4): each filter of the random
  direction is rescaled to the norm of the same filter of the parameters,
  :math:`d_{i,j} \leftarrow d_{i,j} \|\theta_{i,j}\| / \|d_{i,j}\|`, so that the plot's scale
  follows the scale of each filter (networks with batch norm are invariant to it). A filter
  is a slice along the output axis (``filter_axis=-1``: Flax ``Dense`` and ``Conv`` kernels
  keep the outputs last); as in the paper's code (``ignore="biasbn"``), leaves with fewer
  than two dimensions (biases, normalisation scales) get a zero direction.
* ``"towards"``: checkpoint interpolation (Goodfellow, Vinyals & Saxe, 2015):
  :math:`d_1 = \theta' - \theta` for another parameter pytree ``target`` (``a = 1`` is the
  target); a second axis, if asked, is a filter-normalised random direction.
* a pytree (or a list of one or two pytrees) shaped like the parameters: used as given.

The grid points are evaluated in compiled chunks of ``chunk_size`` points (``jax.vmap`` over
the points, one compilation for the whole grid), never one compilation per point. For every
slice the second-order model :math:`L + \sum_i c_i\, g^\top d_i + \tfrac12 \sum_{ij} c_i c_j\,
d_i^\top A d_j` of the operator :math:`A` is returned beside the loss (for eigenvectors
:math:`d_i^\top A d_j = \lambda_i \delta_{ij}`; otherwise from ``dims`` products with
:math:`A`). With a GGN or an empirical Fisher the model is the Gauss-Newton (or Fisher) model,
which differs from the loss by the model's second-order terms.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import linalg as _linalg
from hvp import operators as _ops
from hvp import tree as tu
from hvp.linalg._checks import check_finite_float, check_int, check_key, resolve_chunk

__all__ = ["LandscapeResult", "landscape", "filter_normalized"]

_KINDS = ("eigen", "random", "towards")


@tu.result(static=("kind", "operator"))
class LandscapeResult:
    """A 1-D or 2-D slice of the data-set loss (:func:`landscape`).

    Attributes:
      coordinates: tuple of 1-D float arrays, one per axis: the grid's coefficients
        ``a`` (and ``b``) of the directions.
      losses: the loss at every grid point, shape ``(n_a,)`` or ``(n_a, n_b)``
        (``losses[i, j]`` at ``theta + a_i d_1 + b_j d_2``).
      quadratic: the second-order model of the operator at the same points, same shape.
      loss0: the loss at the parameters (``a = b = 0``).
      grad_dots: ``g . d_i`` per direction (``g`` the gradient over the data set).
      curvatures: matrix ``d_i^T A d_j`` (``dims x dims``) used by the model.
      directions: one dict per direction: ``kind`` (``"eigenvector"``,
        ``"filter_normalized_random"``, ``"towards_target"``, ``"given"``), ``norm``, and for
        eigenvectors ``eigenvalue``, ``residual``, ``converged``.
      num_evaluations: data-set loss evaluations (grid points; a Python int).
      num_matvecs: operator products (eigsh and the model's curvatures; a Python int).
      kind: ``"eigen"``, ``"random"``, ``"towards"`` or ``"given"``.
      operator: the operator's ``kind`` (``"hessian"``, ``"ggn"``, ``"empirical_fisher"``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p) ** 2), jnp.zeros(2), (jnp.eye(2), jnp.zeros(2)))
      >>> r = hvp.landscape(H, directions=jnp.array([1.0, 0.0]), num_points=3)
      >>> r.losses.tolist(), r.quadratic.tolist()  # L(a e_1) = a^2 / 2, exactly quadratic
      ([0.5, 0.0, 0.5], [0.5, 0.0, 0.5])
    """

    coordinates: tuple
    losses: Any
    quadratic: Any
    loss0: Any
    grad_dots: Any
    curvatures: Any
    directions: tuple
    num_evaluations: int
    num_matvecs: int
    kind: str = "eigen"
    operator: str = "hessian"


def filter_normalized(direction, params, *, filter_axis: int = -1, zero_1d: bool = True):
    r"""Rescale every filter of ``direction`` to the norm of the same filter of ``params``.

    Li et al. (2018), sec. 4: :math:`d_{i,j} \leftarrow d_{i,j}\, \|\theta_{i,j}\| /
    \|d_{i,j}\|` for filter ``j`` of leaf ``i``. A filter is a slice at a fixed index of
    ``filter_axis`` (default the last axis: the output features of Flax ``Dense``/``Conv``
    kernels; use ``0`` for PyTorch-layout weights). Leaves with fewer than two dimensions
    (biases, normalisation scales and offsets) are set to zero with ``zero_1d=True`` (the
    paper's ``ignore="biasbn"``) and otherwise rescaled as one filter. A zero filter of the
    direction stays zero.

    Args:
      direction: pytree like ``params`` (e.g. ``hvp.tree.normal_like(key, params)``).
      params: the parameters (pytree of floating arrays).
      filter_axis: the axis that indexes filters in leaves of two or more dimensions.
      zero_1d: zero the direction on leaves with fewer than two dimensions.

    Returns:
      A pytree like ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.landscape import filter_normalized
      >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
      >>> d = filter_normalized({"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, params)
      >>> jnp.linalg.norm(d["kernel"], axis=0).tolist(), d["bias"].tolist()  # column norms 5, 1
      ([5.0, 1.0], [0.0, 0.0])
    """
    tu.assert_same_structure(direction, params, name="direction", check_dtype=False)

    def leaf(d, p):
        d = jnp.asarray(d)
        p = jnp.asarray(p, d.dtype)
        if d.ndim < 2:
            if zero_1d:
                return jnp.zeros_like(d)
            dn = jnp.linalg.norm(d)
            return jnp.where(dn > 0, d * (jnp.linalg.norm(p) / jnp.where(dn > 0, dn, 1)), 0)
        axis = filter_axis % d.ndim
        others = tuple(i for i in range(d.ndim) if i != axis)
        dn = jnp.sqrt(jnp.sum(d * d, axis=others, keepdims=True))
        pn = jnp.sqrt(jnp.sum(p * p, axis=others, keepdims=True))
        return jnp.where(dn > 0, d * (pn / jnp.where(dn > 0, dn, 1)), 0)

    return jax.tree_util.tree_map(leaf, direction, params)


@functools.partial(jax.jit, static_argnames=("dims",))
def _grid_losses(op, params, dirs, coords, *, dims):
    """The data-set loss at ``params + coords[k] @ dirs`` for a chunk of grid points (vmapped)."""

    def at(c):
        p = params
        for i in range(dims):
            p = tu.axpy(c[i], tu.index(dirs, i), p)
        return _ops.data_loss(op, p)

    return jax.vmap(at)(coords)


def _streamed_grid_losses(op, params, dirs, chunks) -> np.ndarray:
    """Every grid point's data-set loss over a streamed data set, in **one** pass over the data.

    Each batch is read once; the loss of every point is taken on it (``chunks`` of points under
    ``vmap``, one after the other under ``lax.map``) and the batch weights are those of
    :func:`hvp.operators.data_loss` (:func:`hvp.operators.weighted_sum`).
    """
    f = _ops.batch_loss(op)
    dims = chunks.shape[-1]
    cs = jnp.asarray(chunks)

    def losses(batch):
        def at(c):
            p = params
            for i in range(dims):
                p = tu.axpy(c[i], tu.index(dirs, i), p)
            return f(p, batch)

        return jnp.ravel(jax.lax.map(jax.vmap(at), cs))

    return np.asarray(_ops.weighted_sum(losses, op.dataset, op.reduction, like=params))


def _span(span, kind: str) -> tuple[float, float]:
    if span is None:
        return (-0.5, 1.5) if kind == "towards" else (-1.0, 1.0)
    if isinstance(span, (tuple, list)):
        if len(span) != 2:
            raise ValueError(
                f"`span` must be a number s (for [-s, s]) or a pair (lo, hi), got {span!r}."
            )
        lo = float(span[0])
        hi = float(span[1])
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"`span` = (lo, hi) needs finite lo < hi, got {span!r}.")
        return lo, hi
    s = check_finite_float("span", span, positive=True, hint="The grid is [-span, span].")
    return -s, s


def _given(directions, params) -> list:
    vs = list(directions) if isinstance(directions, list) else [directions]
    if not 1 <= len(vs) <= 2:
        raise ValueError(f"Give one or two directions (a 1-D or 2-D slice), got {len(vs)}.")
    out = []
    for i, v in enumerate(vs):
        tu.assert_same_structure(v, params, name=f"directions[{i}]", check_dtype=False)
        out.append(tu.map(lambda a, p: jnp.asarray(a, jnp.result_type(p)), v, params))
    return out


def landscape(
    op: _ops.CurvatureOperator,
    *,
    directions="eigen",
    dims: int = 1,
    target=None,
    key=None,
    span=None,
    num_points: int = 21,
    chunk_size: int | None = None,
    filter_axis: int = -1,
    zero_1d: bool = True,
    eigsh_tol: float = 1e-6,
) -> LandscapeResult:
    r"""A 1-D or 2-D slice of the data-set loss of ``op`` around its parameters.

    ``f(a) = L(theta + a d_1)`` on ``num_points`` values of ``a`` in ``span`` (or
    ``f(a, b) = L(theta + a d_1 + b d_2)`` on a ``num_points x num_points`` grid), with
    :math:`L` the loss over the operator's data set, exactly weighted (see the module
    docstring for the directions, the filter normalisation and the second-order model).

    Args:
      op: a curvature operator over a data set (:func:`hvp.hessian`, :func:`hvp.ggn`,
        :func:`hvp.empirical_fisher`); its parameters (the ``wrt`` block, if any) are moved.
      directions: ``"eigen"`` (top eigenvectors of ``op``, default), an
        :class:`~hvp.EigshResult` of ``op`` (its top ``dims`` eigenpairs are used, no new
        products: e.g. the ``eigsh`` an analysis already ran), ``"random"``
        (filter-normalised Gaussian directions, needs ``key``), ``"towards"`` (towards
        ``target``), or a pytree / list of one or two pytrees shaped like ``op.params``.
      dims: 1 or 2 (ignored for given directions: their number decides).
      target: a parameter pytree like ``op.params`` for ``directions="towards"``.
      key: PRNG key for ``"eigen"`` (the Lanczos start vector), ``"random"`` and a 2-D
        ``"towards"`` slice (its second axis).
      span: the coefficient range: ``s`` for ``[-s, s]`` or ``(lo, hi)``; default
        ``[-1, 1]`` (``(-0.5, 1.5)`` for ``"towards"``).
      num_points: grid points per axis (>= 2; odd numbers include 0).
      chunk_size: grid points evaluated at once (one ``vmap``); default up to 8.
      filter_axis: the filters' axis of the random directions (:func:`filter_normalized`).
      zero_1d: zero the random directions on biases and other 1-D leaves
        (:func:`filter_normalized`).
      eigsh_tol: tolerance of :func:`hvp.eigsh` for ``"eigen"``.

    Returns:
      A :class:`LandscapeResult` (JSON-serialisable: ``result.to_json()``).

    Raises:
      TypeError: ``op`` is not a curvature operator; a missing or malformed ``key``.
      ValueError: an unknown ``directions`` string, ``dims`` not 1 or 2, ``"towards"``
        without ``target``, a ``target``/direction not shaped like ``op.params``, a bad
        ``span``, ``num_points`` or ``chunk_size``.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
      >>> H = hvp.hessian(loss, jnp.zeros(2), (jnp.diag(jnp.array([1.0, 2.0])), jnp.ones(2)))
      >>> r = hvp.landscape(H, key=jax.random.key(0), num_points=5)  # along the top eigenvector
      >>> round(r.directions[0]["eigenvalue"], 6), bool(jnp.allclose(r.losses, r.quadratic))
      (4.0, True)
    """
    if not isinstance(op, _ops.CurvatureOperator):
        raise TypeError(
            "landscape needs a curvature operator over a data set (hvp.hessian, hvp.ggn or "
            f"hvp.empirical_fisher), got {type(op).__name__}."
        )
    params = op.params
    num_points = check_int("num_points", num_points, minimum=2)
    eig = None
    if isinstance(directions, _linalg.EigshResult):
        eig = directions
        kind = "eigen"
        dims = check_int("dims", dims, minimum=1)
        if dims > min(2, int(np.shape(eig.eigenvalues)[0])):
            raise ValueError(
                f"`dims` must be 1 or 2 and at most the number of eigenpairs given "
                f"({int(np.shape(eig.eigenvalues)[0])}), got {dims}."
            )
        tu.assert_same_structure(
            eig.eigenvectors, params, name="directions.eigenvectors", check_dtype=False, leading=1
        )
    elif isinstance(directions, str):
        if directions not in _KINDS:
            raise ValueError(
                f"`directions` must be one of {_KINDS}, an hvp.eigsh result, or a pytree (or list "
                f"of pytrees) shaped like the parameters, got {directions!r}."
            )
        kind = directions
        dims = check_int("dims", dims, minimum=1)
        if dims > 2:
            raise ValueError(f"`dims` must be 1 or 2 (a line or a plane), got {dims}.")
        if kind == "towards" and target is None:
            raise ValueError(
                'directions="towards" needs `target=`: the other parameter pytree (e.g. another '
                "checkpoint's parameters) to interpolate towards."
            )
        if kind != "towards" or dims == 2:
            check_key(key)
    else:
        kind = "given"
    lo, hi = _span(span, kind)

    num_matvecs = 0
    info: list[dict] = []
    vecs: list = []
    eigenvalues = None
    if kind == "eigen":
        if eig is None:
            r = _linalg.eigsh(op, dims, key=key, which="largest", tol=eigsh_tol)
            num_matvecs += int(r.num_matvecs)
        else:
            r = eig
        # descending: the top eigenvector first
        order = [int(i) for i in np.argsort(-np.asarray(r.eigenvalues), kind="stable")[:dims]]
        eigenvalues = [float(r.eigenvalues[i]) for i in order]
        for rank, i in enumerate(order):
            vecs.append(tu.index(r.eigenvectors, i))
            info.append(
                {
                    "kind": "eigenvector",
                    "rank": rank,
                    "eigenvalue": float(r.eigenvalues[i]),
                    "residual": float(r.residuals[i]),
                    "converged": bool(r.converged[i]),
                }
            )
    elif kind == "random":
        for i in range(dims):
            d = tu.normal_like(jax.random.fold_in(key, i), params)
            vecs.append(filter_normalized(d, params, filter_axis=filter_axis, zero_1d=zero_1d))
            info.append({"kind": "filter_normalized_random", "filter_axis": filter_axis})
    elif kind == "towards":
        tu.assert_same_structure(target, params, name="target", check_dtype=False)
        vecs.append(tu.map(lambda t, p: jnp.asarray(t, jnp.result_type(p)) - p, target, params))
        info.append({"kind": "towards_target"})
        if dims == 2:
            d = tu.normal_like(jax.random.fold_in(key, 1), params)
            vecs.append(filter_normalized(d, params, filter_axis=filter_axis, zero_1d=zero_1d))
            info.append({"kind": "filter_normalized_random", "filter_axis": filter_axis})
    else:
        vecs = _given(directions, params)
        info = [{"kind": "given"} for _ in vecs]
    dims = len(vecs)
    for d, entry in zip(vecs, info):
        entry["norm"] = float(tu.norm(d))

    # second-order model: L0 + c.g_d + 1/2 c^T C c
    loss0, grad = _ops.data_loss_and_grad(op, params)
    grad_dots = np.array([float(tu.dot(grad, d)) for d in vecs])
    if eigenvalues is not None:
        curv = np.diag(eigenvalues)
    else:
        avs = [op.mv(d) for d in vecs]
        num_matvecs += dims
        curv = np.array(
            [[float(tu.dot(vecs[i], avs[j])) for j in range(dims)] for i in range(dims)]
        )
        curv = 0.5 * (curv + curv.T)

    axis = np.linspace(lo, hi, num_points)
    if dims == 1:
        coords = axis[:, None]
    else:
        aa, bb = np.meshgrid(axis, axis, indexing="ij")
        coords = np.stack([aa.ravel(), bb.ravel()], axis=1)
    count = coords.shape[0]
    chunk = resolve_chunk(chunk_size, count)
    padded = -(-count // chunk) * chunk
    cdtype = tu.accumulation_dtype(*[jnp.result_type(x) for x in jax.tree_util.tree_leaves(params)])
    cpad = np.zeros((padded, dims), dtype=cdtype)
    cpad[:count] = coords
    stacked = tu.stack(vecs)
    if getattr(op, "streaming", False):  # a streamed data set: the whole grid in one data pass
        losses = _streamed_grid_losses(op, params, stacked, cpad.reshape(-1, chunk, dims))[:count]
    else:
        out = [
            np.asarray(
                _grid_losses(op, params, stacked, jnp.asarray(cpad[s : s + chunk]), dims=dims)
            )
            for s in range(0, padded, chunk)
        ]
        losses = np.concatenate(out)[:count]
    quad = float(loss0) + coords @ grad_dots + 0.5 * np.einsum("pi,ij,pj->p", coords, curv, coords)
    shape = (num_points,) * dims
    return LandscapeResult(
        coordinates=tuple(axis.copy() for _ in range(dims)),
        losses=losses.reshape(shape),
        quadratic=quad.reshape(shape),
        loss0=np.asarray(loss0),
        grad_dots=grad_dots,
        curvatures=curv,
        directions=tuple(info),
        num_evaluations=int(count),
        num_matvecs=int(num_matvecs),
        kind=kind,
        operator=op.kind,
    )
