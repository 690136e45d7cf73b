r"""Per-layer traces of a curvature operator: :math:`\operatorname{tr} A_{ll}` per layer.

A *layer* is a group of parameter leaves sharing a module path (:func:`hvp.tree.layer_of`);
the traces of the diagonal blocks come from the per-probe leaf sums of
:func:`hvp.linalg.diagonal`, so that sums of layers (blocks) get honest standard errors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from hvp import tree as tu
from hvp.linalg._checks import check_int, check_key
from hvp.linalg._diagonal import diagonal
from hvp.linalg._driver import Checkpoint
from hvp.operators import as_operator
from hvp.tree import group_by_layer, layer_of
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["layer_trace", "LayerTrace"]


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
      samples: per-probe layer sums :math:`z_{i,l}^\top (A z_i)_l`, shape ``(m, num_layers)``
        (per basis vector for ``"exact"``), from which :meth:`grouped` gets honest standard
        errors of sums of layers; ``None`` when not kept.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.linalg import layer_trace
      >>> params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(3)}}
      >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 6.0)), like=params)
      >>> lt = layer_trace(op, key=jax.random.key(0), method="exact")
      >>> lt.layers, lt.estimate.round(4).tolist(), round(float(lt.total), 4)  # 1 + 2, 3 + 4 + 5
      (('a', 'b'), [3.0, 12.0], 15.0)
    """

    layers: tuple
    estimate: Any
    std_error: Any
    total: Any
    total_std_error: Any
    num_matvecs: Any
    method: str
    samples: Any = None

    def grouped(self, group: Callable[[str], str] | dict) -> LayerTrace:
        r"""Sum layers into groups (e.g. blocks): traces add, standard errors come from the probes.

        The layers of a group share the probes, so their errors are correlated; the group's
        standard error is that of the per-probe group sums (sample standard deviation over
        :math:`\sqrt m`), not a sum in quadrature.

        Args:
          group: layer name -> group name, a callable or a dict (e.g.
            ``dict(zip(labels.layers, labels.block))`` from :func:`hvp.tree.layer_labels`).

        Returns:
          A :class:`LayerTrace` whose ``layers`` are the groups in order of first appearance
          (``total``, ``total_std_error`` and ``num_matvecs`` unchanged).

        Raises:
          ValueError: if the per-probe ``samples`` were not kept.

        Examples:
          >>> import jax, jax.numpy as jnp, hvp
          >>> from hvp.linalg import layer_trace
          >>> params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(3)}}
          >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 6.0)), like=params)
          >>> lt = layer_trace(op, key=jax.random.key(0), method="exact")
          >>> [float(x) for x in lt.grouped(lambda name: "all").estimate]
          [15.0]
        """
        if self.samples is None:
            raise ValueError(
                "This LayerTrace has no per-probe `samples`; compute it with hvp.linalg.layer_trace."
            )
        fn = group.__getitem__ if isinstance(group, dict) else group
        names = list(dict.fromkeys(fn(n) for n in self.layers))
        where = {g: i for i, g in enumerate(names)}
        samples = np.asarray(self.samples, dtype=np.float64)
        summed = np.zeros((samples.shape[0], len(names)))
        for j, layer in enumerate(self.layers):
            summed[:, where[fn(layer)]] += samples[:, j]
        est, se = _mean_se_np(summed, exact=self.method == "exact")
        return dataclasses.replace(
            self, layers=tuple(names), estimate=est, std_error=se, samples=summed
        )

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
    key: PRNGKey,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    chunk_size: int | None = None,
    layer_fn: Callable[[str], str] = layer_of,
    like: PyTree | None = None,
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
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
      key: a JAX PRNG key (typed ``jax.random.key`` or ``jax.random.PRNGKey``), required as
        for every estimator; probe ``i`` is drawn from ``fold_in(key, i)`` as in
        :func:`hvp.linalg.diagonal` (``"exact"`` draws none but checks it all the same).
      num_matvecs: number of probes ``m >= 2`` (``"hutchinson"``); with ``m >= n`` the
        exact answer is computed from ``n`` products instead.
      method: ``"hutchinson"`` or ``"exact"``.
      chunk_size: probes (or basis vectors) per compiled call; default all at
        once for Hutchinson, 256 for exact. Peak memory is about
        ``2 * chunk_size`` parameter copies plus the operator's own.
      layer_fn: leaf path -> layer name (default :func:`hvp.tree.layer_of`).
      like: the parameter pytree, when ``op`` is a matvec callable.
      driver: ``"auto"``, ``"compiled"`` or ``"host"``, as in :func:`hvp.linalg.diagonal`.
      progress: host driver: show the products done (``None``: when stderr is a terminal).
      checkpoint: host driver: a path or :class:`hvp.linalg.Checkpoint` to save the state to
        and resume from (see ``docs/drivers.md``).

    Returns:
      A :class:`LayerTrace` (with the per-probe layer sums in ``samples``); ``num_matvecs``
      is a Python int.

    Raises:
      TypeError: ``key`` is not a PRNG key, or ``num_matvecs`` is not an int.
      ValueError: ``num_matvecs < 2`` or an unknown ``method``.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.linalg import layer_trace
      >>> params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(3)}}
      >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 6.0)), like=params)
      >>> lt = layer_trace(op, key=jax.random.key(0), num_matvecs=4)  # exact for a diagonal A
      >>> lt.method, lt.estimate.round(4).tolist(), lt.std_error.round(4).tolist()
      ('hutchinson', [3.0, 12.0], [0.0, 0.0])
    """
    op = as_operator(op, like)
    names = list(group_by_layer(op.like, layer_fn=layer_fn))
    n = op.size
    check_key(key)
    if method == "hutchinson":
        m = check_int(
            "num_matvecs", num_matvecs, minimum=2, hint="Two probes at least give a standard error."
        )
    elif method == "exact":
        m = n
    else:
        raise ValueError(f"Unknown method {method!r}; use 'hutchinson' or 'exact'.")
    # One estimator for diagonals and block traces: hvp.linalg.diagonal keeps the per-probe leaf
    # sums, so grouping leaves into layers gives honest standard errors (and is exact for m >= n).
    diag = diagonal(
        op,
        key=key,
        num_matvecs=m,
        chunk_size=chunk_size,
        driver=driver,
        progress=progress,
        checkpoint=checkpoint,
    )
    by_layer = diag.sum_by(layer_fn)
    total = diag.trace()
    est = np.array([float(by_layer.estimate[k]) for k in names])
    se = np.array([float(by_layer.std_error[k]) for k in names])
    where = {name: i for i, name in enumerate(names)}
    leaf_samples = jax.tree_util.tree_leaves(diag.leaf_samples)
    samples = np.zeros((np.shape(leaf_samples[0])[0], len(names)))
    for path, s in zip(tu.leaf_paths(diag.leaf_samples), leaf_samples):
        samples[:, where[layer_fn(path)]] += np.asarray(s, dtype=np.float64)
    return LayerTrace(
        layers=tuple(names),
        estimate=est,
        std_error=se,
        total=float(total.estimate),
        total_std_error=float(total.std_error),
        num_matvecs=int(diag.num_matvecs),
        method="exact" if diag.method == "exact" else "hutchinson",
        samples=samples,
    )


def _mean_se_np(samples: np.ndarray, *, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """Column estimates and standard errors of per-probe sums (as :func:`hvp.linalg.diagonal`)."""
    m = samples.shape[0]
    if exact:
        return samples.sum(axis=0), np.zeros(samples.shape[1])
    if m < 2:
        return samples.mean(axis=0), np.full(samples.shape[1], np.inf)
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(m)
