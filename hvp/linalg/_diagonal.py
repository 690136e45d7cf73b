r"""Stochastic estimation of the diagonal of an operator, and per-leaf traces.

Bekas, Kokiopoulou & Saad (*An estimator for the diagonal of a matrix*, Appl.
Numer. Math. 57, 2007): for i.i.d. Rademacher probes :math:`z_k`
(:math:`z_k \odot z_k = 1`),

.. math:: \hat d = \frac1m \sum_{k=1}^m z_k \odot A z_k, \qquad
          (z \odot A z)_i = A_{ii} + \sum_{j \ne i} z_i z_j A_{ij},

so every entry is an average of i.i.d. samples with mean :math:`A_{ii}` and
variance :math:`\sum_{j\ne i} A_{ij}^2`; its standard error is the per-entry
sample standard deviation over :math:`\sqrt m`. The mean and the centred sum of
squares are accumulated chunk by chunk (Chan, Golub & LeVeque's pairwise
update), so memory stays at a few parameter-sized pytrees whatever ``m``.

The trace of each leaf's diagonal block, :math:`\operatorname{tr}(A_{\ell\ell})
= \sum_{i \in \ell} A_{ii}`, is estimated from the per-probe sums
:math:`z_{k,\ell}^\top (A z_k)_\ell` (also i.i.d. across probes), which are kept
(``m`` scalars per leaf) so that :meth:`DiagonalResult.sum_by_leaf` has an
honest standard error: summing per-entry standard errors would ignore the
correlations between the entries of one probe.

With ``num_matvecs >= n`` the diagonal is computed exactly from the ``n``
products :math:`A e_i` (``method="exact"``, zero standard errors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from hvp import tree as tu
from hvp.linalg._checks import (
    DtypePolicy,
    acc_dtype,
    apply_in_dtype,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
    raise_if_nonfinite,
    resolve_chunk,
)
from hvp.linalg._probes import probes
from hvp.linalg._stats import chan_update
from hvp.linalg._stats import mean_std_error as _mean_se
from hvp.linalg._stats import normal_quantile as _normal_quantile
from hvp.linalg._trace import (
    TraceResult,
    exact_map,
)
from hvp.typing import OperatorLike, PRNGKey

__all__ = ["DiagonalResult", "LeafTraces", "diagonal"]

PyTree = Any


@tu.result(static=("num_matvecs", "method"))
class LeafTraces:
    """Traces of diagonal blocks (per leaf, or per group of leaves) with standard errors.

    Attributes:
      estimate: a pytree shaped like the parameters with one scalar per leaf
        (:meth:`DiagonalResult.sum_by_leaf`), or a ``{group: scalar}`` dict
        (:meth:`DiagonalResult.sum_by`).
      std_error: the same structure: standard errors from the per-probe sums.
      num_matvecs: operator products behind the estimate.
      method: ``"hutchinson"`` or ``"exact"``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)), {"a": jnp.zeros(2), "b": jnp.zeros(4)})
        >>> leaves = hvp.diagonal(op, key=jax.random.PRNGKey(0), num_matvecs=4).sum_by_leaf()
        >>> {k: round(float(v), 4) for k, v in leaves.estimate.items()}  # 1 + 2 and 3 + 4 + 5 + 6
        {'a': 3.0, 'b': 18.0}
    """

    estimate: PyTree
    std_error: PyTree
    num_matvecs: int
    method: str = "hutchinson"

    def confidence_interval(self, level: float = 0.95):
        """Per-entry normal intervals ``(lower, upper)``, each with the structure of ``estimate``."""
        z = _normal_quantile(level)
        lo = jax.tree_util.tree_map(lambda e, s: e - z * s, self.estimate, self.std_error)
        hi = jax.tree_util.tree_map(lambda e, s: e + z * s, self.estimate, self.std_error)
        return lo, hi


def _stats(samples: jax.Array, exact: bool):
    if exact:
        return jnp.sum(samples), jnp.zeros((), samples.dtype)
    return _mean_se(samples)


@tu.result(static=("num_matvecs", "method", "dtype_policy"))
class DiagonalResult:
    """Estimate of :math:`\\operatorname{diag}(A)` as a pytree shaped like the parameters.

    Attributes:
      estimate: the diagonal, a pytree like the parameters.
      std_error: per-entry standard errors (same pytree).
      num_matvecs: operator products spent.
      method: ``"hutchinson"`` (Bekas et al. 2007) or ``"exact"`` (``num_matvecs >= n``).
      leaf_samples: per-probe leaf sums :math:`z_{k,\\ell}^\\top (A z_k)_\\ell`, one
        ``(m,)`` array per leaf (for ``"exact"``: the exact leaf traces, shape ``(1,)``).
      dtype_policy: the :class:`~hvp.linalg.DtypePolicy` used: products in the parameters'
        dtype, ``estimate``/``std_error`` accumulated and returned in ``accumulate``
        (at least float32).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> res = hvp.diagonal(hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0, 3.0]))), key=jax.random.key(0), num_matvecs=3)
      >>> res.method, res.estimate.round(4).tolist(), res.num_matvecs
      ('exact', [1.0, 2.0, 3.0], 3)
    """

    estimate: PyTree
    std_error: PyTree
    num_matvecs: int
    leaf_samples: PyTree
    method: str = "hutchinson"
    dtype_policy: DtypePolicy | None = None

    @property
    def _exact(self) -> bool:
        return self.method == "exact"

    def sum_by_leaf(self) -> LeafTraces:
        """Trace of each leaf's diagonal block (e.g. per layer kernel / bias) with honest standard errors.

        The estimate of leaf ``l`` equals the sum of ``estimate``'s entries in
        that leaf; its standard error comes from the per-probe leaf sums.
        """
        pairs = jax.tree_util.tree_map(lambda s: _stats(s, self._exact), self.leaf_samples)
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        est = jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
        se = jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)
        return LeafTraces(
            estimate=est, std_error=se, num_matvecs=self.num_matvecs, method=self.method
        )

    def sum_by(self, group: Callable[[str], str]) -> LeafTraces:
        """Traces of groups of leaves, e.g. per layer: ``group(path) -> name``.

        ``path`` is the leaf's ``"a/b/kernel"`` path (:func:`hvp.tree.path_str`);
        leaves mapped to the same name are summed per probe before the mean and
        standard error are taken. Returns a :class:`LeafTraces` whose
        ``estimate``/``std_error`` are ``{name: scalar}`` dicts in first-seen order.
        Example: ``res.sum_by(lambda p: p.rsplit("/", 1)[0])`` gives per-layer traces.
        """
        if not callable(group):
            raise TypeError(
                "`group` must be a function from a leaf path (str) to a group name (str)."
            )
        paths = tu.leaf_paths(self.leaf_samples)
        groups: dict[str, jax.Array] = {}
        for path, s in zip(paths, jax.tree_util.tree_leaves(self.leaf_samples)):
            name = group(path)
            groups[name] = s if name not in groups else groups[name] + s
        est, se = {}, {}
        for name, s in groups.items():
            est[name], se[name] = _stats(s, self._exact)
        return LeafTraces(
            estimate=est, std_error=se, num_matvecs=self.num_matvecs, method=self.method
        )

    def trace(self) -> TraceResult:
        """The Hutchinson trace estimate from the same probes (sum of all leaf samples)."""
        leaves = jax.tree_util.tree_leaves(self.leaf_samples)
        total = sum(leaves[1:], leaves[0])
        est, se = _stats(total, self._exact)
        return TraceResult(
            estimate=est,
            std_error=se,
            num_matvecs=self.num_matvecs,
            method="exact" if self._exact else "hutchinson",
            samples=total,
            dtype_policy=self.dtype_policy,
        )


def _block_stats(op, key, start, size: int):
    zs = probes(key, op.like, size, "rademacher", start=start)
    azs = jax.vmap(lambda z: apply_in_dtype(op, z))(zs)
    acc = acc_dtype(op.like)
    prods = tu.map(lambda z, az: z.astype(acc) * az.astype(acc), zs, azs)  # z * A z, per probe
    mean = tu.map(lambda x: jnp.mean(x, axis=0), prods)
    m2 = tu.map(lambda x, mu: jnp.sum((x - mu) ** 2, axis=0), prods, mean)
    leaf_sums = tu.map(lambda x: jnp.sum(x, axis=tuple(range(1, x.ndim))), prods)
    return mean, m2, leaf_sums


@partial(jax.jit, static_argnames=("num_matvecs", "chunk"))
def _diagonal(op, key, *, num_matvecs: int, chunk: int | None):
    m = num_matvecs
    c = m if chunk is None else min(chunk, m)
    n_full, rem = divmod(m, c)
    like = tu.cast(op.like, acc_dtype(op.like))  # accumulators in >= float32
    acc = (
        jnp.zeros((), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32),
        tu.zeros_like(like),
        tu.zeros_like(like),
    )

    def body(acc, b):
        mean, m2, sums = _block_stats(op, key, b * c, c)
        return chan_update(acc, c, mean, m2), sums

    acc, sums = lax.scan(body, acc, jnp.arange(n_full))
    sums = tu.map(lambda x: x.reshape(-1), sums)
    if rem:
        mean, m2, rsums = _block_stats(op, key, n_full * c, rem)
        acc = chan_update(acc, rem, mean, m2)
        sums = tu.map(lambda a, b: jnp.concatenate([a, b]), sums, rsums)
    _, mean, m2 = acc
    if m >= 2:
        se = tu.map(lambda q: jnp.sqrt(q / (m - 1)) / math.sqrt(m), m2)
    else:
        se = tu.map(lambda x: jnp.full_like(x, jnp.inf), mean)
    return mean, se, sums


@partial(jax.jit, static_argnames=("chunk",))
def _exact_diagonal(op, *, chunk: int | None):
    unravel = tu.unravel_fn(tu.cast(op.like, acc_dtype(op.like)))
    diag = unravel(exact_map(op, tu.dot, chunk))
    sums = tu.map(lambda x: jnp.sum(x).reshape(1), diag)
    return diag, tu.zeros_like(diag), sums


def diagonal(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_matvecs: int = 100,
    chunk_size: int | None = None,
    like: PyTree | None = None,
) -> DiagonalResult:
    r"""Estimate :math:`\operatorname{diag}(A)` (Bekas, Kokiopoulou & Saad 2007).

    :math:`\hat d = \frac1m\sum_k z_k \odot A z_k` with Rademacher probes; the
    per-entry standard error is the sample standard deviation of
    :math:`z_k \odot A z_k` over :math:`\sqrt m` (the error falls like
    :math:`1/\sqrt m`; the variance of entry ``i`` is :math:`\sum_{j\ne i} A_{ij}^2`).

    Args:
      op: a :class:`~hvp.LinearOperator`, a ``matvec`` callable (with ``like=``)
        or a dense square matrix.
      key: a JAX PRNG key; the same key gives the same result (probe ``k`` is
        drawn from ``fold_in(key, k)``, the same probes as :func:`hvp.linalg.trace`
        with ``method="hutchinson"``).
      num_matvecs: number of probes (products), >= 1; with ``num_matvecs >= n``
        the exact diagonal is computed from ``n`` products.
      chunk_size: at most this many products at once (a ``lax.scan`` over
        chunks keeps the memory at a few parameter-sized pytrees); ``None`` (default):
        the memory rule of :func:`hvp.linalg.trace`, at most 8 at once.
      like: example pytree of the vectors when ``op`` is a plain callable.

    Returns:
      :class:`DiagonalResult`: ``estimate`` and ``std_error`` shaped like the
      parameters (in the accumulation dtype, at least float32), ``num_matvecs``,
      ``dtype_policy``, and :meth:`~DiagonalResult.sum_by_leaf` /
      :meth:`~DiagonalResult.sum_by` / :meth:`~DiagonalResult.trace` for block traces.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> res = hvp.diagonal(op, key=jax.random.PRNGKey(0), num_matvecs=8)  # exact for a diagonal A
        >>> res.estimate.round(4)
        Array([1., 2., 3., 4., 5., 6.], dtype=float64)
    """
    op = coerce_operator(op, like)
    check_key(key)
    num_matvecs = check_int("num_matvecs", num_matvecs, minimum=1)
    policy = dtype_policy(op.like)
    if num_matvecs >= op.size:
        chunk = resolve_chunk(chunk_size, op.size)
        est, se, sums = _exact_diagonal(op, chunk=chunk)
        res = DiagonalResult(
            estimate=est,
            std_error=se,
            num_matvecs=op.size,
            leaf_samples=sums,
            method="exact",
            dtype_policy=policy,
        )
    else:
        chunk = resolve_chunk(chunk_size, num_matvecs)
        est, se, sums = _diagonal(op, key, num_matvecs=num_matvecs, chunk=chunk)
        res = DiagonalResult(
            estimate=est,
            std_error=se,
            num_matvecs=num_matvecs,
            leaf_samples=sums,
            dtype_policy=policy,
        )
    raise_if_nonfinite(op, "diagonal estimate", *jax.tree_util.tree_leaves(res.estimate))
    return res
