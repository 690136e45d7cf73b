r"""Per-layer views of curvature: eigenvector mass and trace by layer.

Model-agnostic: a *layer* is a group of parameter leaves sharing a module
path, found from the ``a/b/kernel`` path strings of :func:`hvp.tree.leaf_paths`
alone (the path minus its last component: ``Dense_0/kernel`` and
``Dense_0/bias`` form layer ``Dense_0``; ``layers/0/kernel`` is in
``layers/0``). Works for any parameter pytree, Flax or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from hvp import tree as tu
from hvp.linalg import diagonal
from hvp.operators import as_operator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["layer_of", "group_by_layer", "layer_norms", "layer_trace", "LayerTrace"]


def layer_of(path: str) -> str:
    """The layer name of a leaf path: the path minus its last component (``a/b/kernel`` -> ``a/b``).

    A top-level leaf (no ``/``) is its own layer.

    Examples:
        >>> from hvp.flax import layer_of
        >>> layer_of("encoder/dense/kernel"), layer_of("scale")
        ('encoder/dense', 'scale')
    """
    head, sep, _ = path.rpartition("/")
    return head if sep else path


def group_by_layer(tree, *, layer_fn: Callable[[str], str] = layer_of) -> dict[str, list[str]]:
    """Group the leaves of ``tree`` by layer: ``{layer: [leaf paths]}``.

    Layers and paths appear in ``tree_leaves`` order. ``layer_fn`` maps a leaf
    path to its layer name (default :func:`layer_of`); pass e.g.
    ``lambda p: p.split("/")[0]`` to group by top-level module instead.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> params = {"dense": {"bias": jnp.zeros(1), "kernel": jnp.zeros(2)}, "out": {"kernel": jnp.zeros(1)}}
        >>> hvp.flax.group_by_layer(params)
        {'dense': ['dense/bias', 'dense/kernel'], 'out': ['out/kernel']}
    """
    groups: dict[str, list[str]] = {}
    for path in tu.leaf_paths(tree):
        groups.setdefault(layer_fn(path), []).append(path)
    return groups


def _leaf_layer_index(tree, layer_fn) -> tuple[list[str], list[int]]:
    groups = group_by_layer(tree, layer_fn=layer_fn)
    names = list(groups)
    where = {p: i for i, name in enumerate(names) for p in groups[name]}
    return names, [where[p] for p in tu.leaf_paths(tree)]


def layer_norms(
    eigenvectors, *, layer_fn: Callable[[str], str] = layer_of
) -> dict[str, np.ndarray]:
    r"""Share of each vector's squared norm that lies in each layer.

    For vectors :math:`v_j` (rows of a stacked block) and layers :math:`l`,

    .. math:: s_{l j} = \frac{\lVert v_{j,l} \rVert^2}{\lVert v_j \rVert^2},
              \qquad \sum_l s_{l j} = 1,

    which shows where the top curvature directions live (e.g. sharpness
    concentrated in the last layer).

    Args:
      eigenvectors: a stacked block of vectors (params-shaped pytree with a
        leading axis ``k``), or a result with an ``eigenvectors`` field (from
        :func:`hvp.eigsh`).
      layer_fn: leaf path -> layer name (default :func:`layer_of`).

    Returns:
      ``{layer: array of shape (k,)}`` in parameter order.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> params = {"dense": {"bias": jnp.zeros(1), "kernel": jnp.zeros(2)}, "out": {"kernel": jnp.zeros(1)}}
        >>> vecs = {"dense": {"bias": jnp.array([[1.0]]), "kernel": jnp.array([[0.0, 0.0]])}, "out": {"kernel": jnp.array([[1.0]])}}
        >>> {k: v.round(4) for k, v in hvp.flax.layer_norms(vecs).items()}  # one row per eigenvector
        {'dense': array([1.]), 'out': array([1.])}
    """
    block = getattr(eigenvectors, "eigenvectors", eigenvectors)
    leaves = jax.tree_util.tree_leaves(block)
    if not leaves:
        raise ValueError("`eigenvectors` has no array leaves.")
    try:
        k = tu.leading_dim(block)
    except ValueError as err:
        raise ValueError(
            f"`eigenvectors` must be a stacked block (leading axis k on every leaf): {err} "
            "For a single vector pass `hvp.tree.map(lambda x: x[None], v)`."
        ) from None
    names, index = _leaf_layer_index(block, layer_fn)
    sq = np.zeros((len(names), k))
    for x, i in zip(leaves, index):
        a = np.asarray(x, dtype=np.float64).reshape(k, -1)
        sq[i] += np.sum(a * a, axis=1)
    total = sq.sum(axis=0)
    if np.any(total == 0):
        raise ValueError("A vector in `eigenvectors` is zero; its layer shares are undefined.")
    shares = sq / total
    return {name: shares[i] for i, name in enumerate(names)}


@tu.result(static=("layers", "method"))
class LayerTrace:
    r"""Per-layer traces :math:`\operatorname{tr}(A_{ll})` of the diagonal blocks of an operator.

    Attributes:
      layers: layer names (tuple of str), in parameter order.
      estimate: shape ``(num_layers,)``; sums to the trace estimate of ``A``.
      std_error: shape ``(num_layers,)``; zero for ``method="exact"``.
      total: the sum of ``estimate`` (an estimate of ``tr A``).
      total_std_error: its standard error (from the per-probe totals).
      num_matvecs: products with ``A`` used.
      method: ``"hutchinson"`` or ``"exact"``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> params = {"dense": {"bias": jnp.zeros(1), "kernel": jnp.zeros(2)}, "out": {"kernel": jnp.zeros(1)}}
        >>> op = hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0])), params)
        >>> lt = hvp.flax.layer_trace(op, method="exact")
        >>> lt.layers, {k: round(v, 4) for k, v in lt.fractions().items()}
        (('dense', 'out'), {'dense': 0.6, 'out': 0.4})
    """

    layers: tuple
    estimate: Any
    std_error: Any
    total: Any
    total_std_error: Any
    num_matvecs: Any
    method: str

    def as_dict(self) -> dict[str, tuple[float, float]]:
        """``{layer: (estimate, std_error)}``."""
        return {
            n: (float(e), float(s))
            for n, e, s in zip(self.layers, np.asarray(self.estimate), np.asarray(self.std_error))
        }

    def fractions(self) -> dict[str, float]:
        """``{layer: estimate / total}``: each layer's share of the trace."""
        total = float(self.total)
        return {n: float(e) / total for n, e in zip(self.layers, np.asarray(self.estimate))}


def layer_trace(
    op: OperatorLike,
    *,
    key: PRNGKey | None = None,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    chunk_size: int | None = None,
    layer_fn: Callable[[str], str] = layer_of,
    like: PyTree | None = None,
) -> LayerTrace:
    r"""Trace of each layer's diagonal block of a curvature operator, with standard errors.

    ``method="hutchinson"`` (Hutchinson, 1989) draws Rademacher probes
    :math:`z_1, \dots, z_m` and, for each layer :math:`l` (its coordinates
    :math:`z_l`), averages :math:`z_{i,l}^\top (A z_i)_l`, an unbiased
    estimate of :math:`\operatorname{tr} A_{ll} = \sum_{j \in l} A_{jj}` (the
    block-restricted diagonal estimator of Bekas, Kokiopoulou & Saad, 2007).
    Standard errors are the sample standard deviations across probes over
    :math:`\sqrt m`; the per-probe totals give an honest standard error of the
    full trace. ``method="exact"`` applies ``A`` to every basis vector
    (``n`` products; small models and validation only).

    Computed with :func:`hvp.linalg.diagonal` (per-probe leaf sums grouped by
    layer), ``chunk_size`` probes per compiled, vmapped call.

    Args:
      op: a :class:`~hvp.LinearOperator` (e.g. ``problem.hessian(data)``), or a
        matvec callable with ``like=``.
      key: PRNG key (required for ``"hutchinson"``).
      num_matvecs: number of probes ``m`` (``"hutchinson"``).
      method: ``"hutchinson"`` or ``"exact"``.
      chunk_size: probes (or basis vectors) per compiled call; default all at
        once for Hutchinson, 256 for exact. Peak memory is about
        ``2 * chunk_size`` parameter copies plus the operator's own.
      layer_fn: leaf path -> layer name (default :func:`layer_of`).
      like: example pytree when ``op`` is a plain matvec callable.

    Returns:
      A :class:`LayerTrace`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> params = {"dense": {"bias": jnp.zeros(1), "kernel": jnp.zeros(2)}, "out": {"kernel": jnp.zeros(1)}}
        >>> op = hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0])), params)
        >>> lt = hvp.flax.layer_trace(op, key=jax.random.PRNGKey(0), num_matvecs=8)
        >>> lt.estimate.round(4), round(float(lt.total), 4)  # dense: 1 + 2 + 3, out: 4 (exact for a diagonal A)
        (array([6., 4.]), 10.0)
    """
    op = as_operator(op, like)
    names, _ = _leaf_layer_index(op.like, layer_fn)
    n = op.size
    if method == "hutchinson":
        if key is None:
            raise ValueError(
                "layer_trace(method='hutchinson') needs a PRNG key: pass `key=jax.random.key(0)`."
            )
        if not isinstance(num_matvecs, (int, np.integer)) or num_matvecs < 2:
            raise ValueError(
                f"`num_matvecs` must be an integer >= 2 (for a standard error), got {num_matvecs!r}."
            )
        m = int(num_matvecs)
    elif method == "exact":
        key, m = (jax.random.PRNGKey(0) if key is None else key), n
    else:
        raise ValueError(f"Unknown method {method!r}; use 'hutchinson' or 'exact'.")
    # One estimator for diagonals and block traces: hvp.linalg.diagonal keeps the per-probe leaf
    # sums, so grouping leaves into layers gives honest standard errors (and is exact for m >= n).
    diag = diagonal(op, key=key, num_matvecs=m, chunk_size=chunk_size)
    by_layer = diag.sum_by(layer_fn)
    total = diag.trace()
    est = np.array([float(by_layer.estimate[k]) for k in names])
    se = np.array([float(by_layer.std_error[k]) for k in names])
    return LayerTrace(
        layers=tuple(names),
        estimate=est,
        std_error=se,
        total=float(total.estimate),
        total_std_error=float(total.std_error),
        num_matvecs=int(diag.num_matvecs),
        method="exact" if diag.method == "exact" else "hutchinson",
    )
