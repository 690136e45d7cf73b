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

The estimator is a :class:`~hvp.linalg._driver.StateMachine` (:class:`Diagonal`): each step is
one block product of ``chunk_size`` probes (or unit vectors), merged into the running moments;
probe ``k`` comes from ``fold_in(key, k)``, so the result does not depend on the driver
(compiled or host) nor, up to rounding, on ``chunk_size``, and a checkpointed host run resumes
bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from hvp import tree as tu
from hvp.linalg._checks import (
    DtypePolicy,
    acc_dtype,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
    raise_if_nonfinite,
    resolve_chunk,
)
from hvp.linalg._driver import Checkpoint, Progress, run
from hvp.linalg._probes import ProbeBudget, initial_counters
from hvp.linalg._stats import chan_update
from hvp.linalg._stats import mean_std_error as _mean_se
from hvp.linalg._stats import normal_quantile as _normal_quantile
from hvp.linalg._trace import TraceResult
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
      num_matvecs: operator products spent (a Python int, also under ``jax.jit``).
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


# ------------------------------------------------------------------------------------------------
# the state machine
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Diagonal(ProbeBudget):
    """The diagonal estimator as a state machine: one block product of probes per step.

    Settings (static, they fix the shapes): ``total`` products (``num_matvecs``, or ``n`` for
    the exact path), ``chunk`` products per step, ``exact``.

    State: ``key``; Hutchinson: running ``mean`` and ``m2`` (the centred sum of squares) of
    :math:`z \\odot A z`, pytrees like the parameters in the accumulation dtype, merged block
    by block with Chan's update, and ``leaf_sums``, one ``(total,)`` buffer per leaf of the
    per-probe leaf sums; exact: ``diag``, the sum of :math:`e_i \\odot A e_i` over the unit
    vectors done so far (the diagonal entries, each written once).
    """

    name: ClassVar[str] = "diagonal"

    def update(self, op, state, phase, vs, avs):
        b = self.block_sizes[phase]
        acc = acc_dtype(op.like)
        prods = tu.map(lambda z, az: z.astype(acc) * az.astype(acc), vs, avs)  # z * A z per row
        start = state["matvecs"]
        new = dict(state, **self.advance(state, phase))
        matvecs = new["matvecs"]
        if self.exact:  # each e_i * A e_i has one non-zero entry, at i: the sum is exact
            new["diag"] = tu.map(lambda d, p: d + jnp.sum(p, axis=0), state["diag"], prods)
            return new
        mean = tu.map(lambda x: jnp.mean(x, axis=0), prods)
        m2 = tu.map(lambda x, mu: jnp.sum((x - mu) ** 2, axis=0), prods, mean)
        count = start.astype(acc)
        _, new["mean"], new["m2"] = chan_update((count, state["mean"], state["m2"]), b, mean, m2)
        new["rel_se"] = _relative_std_error(new["mean"], new["m2"], matvecs)
        sums = tu.map(lambda x: jnp.sum(x, axis=tuple(range(1, x.ndim))), prods)
        new["leaf_sums"] = tu.map(
            lambda buf, s: lax.dynamic_update_slice(buf, s.astype(buf.dtype), (start,)),
            state["leaf_sums"],
            sums,
        )
        return new

    def finalize(self, op, state):  # noqa: ARG002
        if self.exact:
            diag = state["diag"]
            sums = tu.map(lambda x: jnp.sum(x).reshape(1), diag)
            return diag, tu.zeros_like(diag), sums
        m = self.total
        if m >= 2:
            se = tu.map(lambda q: jnp.sqrt(q / (m - 1)) / math.sqrt(m), state["m2"])
        else:
            se = tu.map(lambda x: jnp.full_like(x, jnp.inf), state["mean"])
        return state["mean"], se, state["leaf_sums"]

    def progress(self, state) -> Progress:
        k = int(state["matvecs"])
        if self.exact:
            return Progress(matvecs=k, total=self.total, text="exact (unit vectors)")
        rel = float(state["rel_se"])
        text = f"RMS std_error / RMS diagonal {rel:.2e}" if k >= 2 else ""
        return Progress(matvecs=k, total=self.total, text=text)


def _relative_std_error(mean, m2, k):
    """The progress figure: RMS standard error over RMS estimate, ``inf`` below two probes."""
    n = sum(x.size for x in jax.tree_util.tree_leaves(mean))
    sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(mean)) / n
    q = sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(m2)) / n
    kf = k.astype(sq.dtype)
    se2 = q / jnp.maximum((kf - 1.0) * kf, 1.0)
    rel = jnp.sqrt(se2) / jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    return jnp.where((k >= 2) & (sq > 0), rel, jnp.inf)


def _initial_state(like, key, total: int, exact: bool) -> dict:
    acc_like = tu.cast(like, acc_dtype(like))
    state = initial_counters()
    if exact:
        state["diag"] = tu.zeros_like(acc_like)
        return state
    state["key"] = key
    state["mean"] = tu.zeros_like(acc_like)
    state["m2"] = tu.zeros_like(acc_like)
    state["rel_se"] = jnp.full((), jnp.inf, acc_dtype(like))
    state["leaf_sums"] = tu.map(lambda x: jnp.zeros((total,), x.dtype), acc_like)
    return state


def diagonal(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_matvecs: int = 100,
    chunk_size: int | None = None,
    like: PyTree | None = None,
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
) -> DiagonalResult:
    r"""Estimate :math:`\operatorname{diag}(A)` (Bekas, Kokiopoulou & Saad 2007).

    :math:`\hat d = \frac1m\sum_k z_k \odot A z_k` with Rademacher probes; the
    per-entry standard error is the sample standard deviation of
    :math:`z_k \odot A z_k` over :math:`\sqrt m` (the error falls like
    :math:`1/\sqrt m`; the variance of entry ``i`` is :math:`\sum_{j\ne i} A_{ij}^2`).
    The mean and the centred sums of squares are merged block by block (Chan, Golub &
    LeVeque 1979), so memory stays at a few parameter-sized pytrees plus ``chunk_size``
    probes and their products, whatever ``m``.

    Args:
      op: a :class:`~hvp.LinearOperator`, a ``matvec`` callable (with ``like=``)
        or a dense square matrix.
      key: a JAX PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``); the
        same key gives the same result (probe ``k`` is drawn from ``fold_in(key, k)``, the
        same probes as :func:`hvp.linalg.trace` with ``method="hutchinson"``).
      num_matvecs: number of probes (products), >= 1; with ``num_matvecs >= n``
        the exact diagonal is computed from the ``n`` products :math:`A e_i`.
      chunk_size: products per step (one block product each); ``None`` (default): the memory
        rule of :func:`hvp.linalg.trace`, at most 8 at once. The estimate does not depend on
        it beyond rounding.
      like: example pytree of the vectors when ``op`` is a plain callable.
      driver: ``"auto"`` (compiled inside ``jax.jit``/``vmap``, host otherwise), ``"compiled"``
        or ``"host"``; see :mod:`hvp.linalg` ("Drivers"). Both give the same numbers.
      progress: host driver: show products, the relative standard error (RMS ``std_error``
        over RMS estimate) and the time left on stderr (``None``: when stderr is a terminal).
      checkpoint: host driver: a path or :class:`hvp.linalg.Checkpoint` to save the state to
        and resume from (same arguments, same result, bit for bit).

    Returns:
      :class:`DiagonalResult`: ``estimate`` and ``std_error`` shaped like the
      parameters (in the accumulation dtype, at least float32), ``num_matvecs`` (a Python
      int, also under ``jax.jit``: it is fixed by the arguments), ``dtype_policy``, and
      :meth:`~DiagonalResult.sum_by_leaf` / :meth:`~DiagonalResult.sum_by` /
      :meth:`~DiagonalResult.trace` for block traces.

    Works under ``jax.jit`` and ``jax.vmap`` (e.g. over keys; the compiled driver runs
    there): a non-finite result is then returned as NaN instead of raising.

    Raises:
      TypeError: ``key`` is not a PRNG key, ``num_matvecs``/``chunk_size`` not ints, a plain
        callable without ``like=``.
      ValueError: ``num_matvecs < 1``, ``chunk_size < 1``, an unknown ``driver``, or
        ``progress``/``checkpoint`` with the compiled driver.
      NonFiniteError: the operator produced NaN or Inf.

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
    exact = num_matvecs >= op.size
    total = op.size if exact else num_matvecs
    alg = Diagonal(total=total, chunk=resolve_chunk(chunk_size, total), exact=exact)
    state = _initial_state(op.like, key, total, exact)
    (est, se, sums), _ = run(
        alg,
        op,
        state,
        driver=driver,
        progress=progress,
        checkpoint=checkpoint,
        traced=(key,),
        consume=True,
    )
    raise_if_nonfinite(op, "diagonal estimate", *jax.tree_util.tree_leaves(est))
    return DiagonalResult(
        estimate=est,
        std_error=se,
        num_matvecs=total,
        leaf_samples=sums,
        method="exact" if exact else "hutchinson",
        dtype_policy=dtype_policy(op.like),
    )
