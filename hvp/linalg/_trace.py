r"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace.

All three estimate :math:`\operatorname{tr}(A)` of a symmetric operator from
matrix-vector products only, with random probes drawn like the parameters
(Rademacher or Gaussian pytrees) and multiplied in blocks, at most ``chunk_size``
products at a time (default: at most 8, :func:`hvp.linalg._checks.default_chunk_size`).
Products run in the parameters' dtype; dot products, Gram matrices, the orthonormal bases
and their ``eigh`` in at least float32 (:func:`hvp.tree.accumulation_dtype`).

* **Hutchinson** (Girard 1989; Hutchinson 1989): for i.i.d. Rademacher probes
  :math:`z_i` (:math:`\mathbb E[z z^\top] = I`),

  .. math:: \hat t = \frac1m \sum_{i=1}^m z_i^\top A z_i,\qquad
            \operatorname{Var}(z^\top A z) = 2 \sum_{i \ne j} A_{ij}^2 .

  The standard error is the sample standard deviation over :math:`\sqrt m`.

* **Hutch++** (Meyer, Musco, Musco, Woodruff, *Hutch++: Optimal Stochastic
  Trace Estimation*, SOSA 2021): with ``m`` products, ``k = m // 3`` go to a
  range sketch :math:`Q = \operatorname{orth}(A S)`, ``k`` to :math:`AQ`, and
  the remaining ``r = m - 2k`` to Hutchinson on the deflated operator
  :math:`(I - QQ^\top) A (I - QQ^\top)`:

  .. math:: \hat t = \operatorname{tr}(Q^\top A Q)
            + \frac1r \sum_{j=1}^r g_j^\top (I-QQ^\top) A (I-QQ^\top) g_j .

  Given :math:`Q` the first term is exact, so the standard error is the one of
  the Hutchinson part on the residual (sample standard deviation over
  :math:`\sqrt r`); ``samples`` holds :math:`\operatorname{tr}(Q^\top A Q) +
  g_j^\top P A P g_j`, whose mean is the estimate. The error falls like
  :math:`1/m` instead of :math:`1/\sqrt m` when the spectrum decays.

* **XTrace** (Epperly, Tropp, Webber, *XTrace: Making the Most of Every Sample
  in Stochastic Trace Estimation*, SIAM J. Matrix Anal. Appl. 45, 2024): ``m/2``
  Gaussian probes :math:`\omega_i` are used both for the range sketch and for
  the residual, exchangeably: with :math:`P_i` the orthogonal projector onto
  :math:`\operatorname{range}(A\Omega_{-i})`,

  .. math:: t_i = \operatorname{tr}(A P_i) + c_i\,\omega_i^\top (I-P_i) A (I-P_i)\omega_i,
            \qquad c_i = \frac{n - \operatorname{rank} P_i}{\|(I-P_i)\omega_i\|^2},

  and :math:`\hat t = \frac{1}{m/2}\sum_i t_i` with standard error
  :math:`\operatorname{std}(t_i)/\sqrt{m/2}` (the paper's error estimate,
  ``error_estimate="sample"``). That estimate ignores the positive correlation
  of the :math:`t_i` and is measured to be 1.2-1.4x too small on fast-decaying
  spectra, so the default standard error is the jackknife over probes,
  computed from ``m/2 x m/2`` matrices without extra products; it is
  conservative in expectation (Efron & Stein 1981). The
  ``c_i`` normalisation is the paper's "improved" variant: it makes the
  residual probe uniform on the sphere of the complement. All the :math:`P_i`
  come from one QR of :math:`A\Omega` by rank-one downdates, so XTrace costs
  exactly ``m`` products. The range sketch is taken of :math:`(A + \delta
  I)\Omega` with a tiny :math:`\delta` (``10 sqrt(eps)`` relative) so that it
  is well conditioned even when :math:`A` is (numerically) low rank; every
  :math:`t_i` remains unbiased because :math:`P_i` still only depends on
  :math:`\Omega_{-i}` (up to the data-dependent size of :math:`\delta`).

Orthonormalisation of a block of pytree vectors never ravels them: it works in
the ``k x k`` Gram space (SVQB, Stathopoulos & Wu, SIAM J. Sci. Comput. 2002,
applied twice), dropping directions whose Gram eigenvalue is below ``10 k eps``
of the largest.

**Budget at least n.** When ``num_matvecs >= n`` (the operator's size) the
trace is computed exactly with the ``n`` products :math:`e_i^\top A e_i`
(``method="exact"``, ``std_error = 0``, ``samples`` = the diagonal), because
no randomised method can beat that for the same cost.

**State machines and drivers.** Each method is a :class:`hvp.linalg._driver.StateMachine`
whose step is one block product, run by :func:`hvp.linalg._driver.run` (compiled inside
``jax.jit``/``jax.vmap``, host loop otherwise, with progress and checkpoint/resume):

===============  ==================================================================
machine          steps (block products)
===============  ==================================================================
``Hutchinson``   ``chunk_size`` probes per step, then the remainder
``HutchPP``      the sketch ``S``, then ``Q``, then the deflated residual probes,
                 ``chunk_size`` at a time (three blocks when they fit one chunk)
``XTrace``       the probes ``Omega``, then ``Q`` (two blocks; the driver splits
                 each into chunks of ``chunk_size``); the samples need no product
``ExactTrace``   ``chunk_size`` unit vectors per step, then the remainder
===============  ==================================================================

Probe ``i`` always comes from ``fold_in(key, i)`` (:mod:`hvp.linalg._probes`), so the
estimate does not depend on the chunk size nor on the driver. Adaptive mode is a loop over
rounds, each one run of a machine that starts from the previous round's state (Hutch++ and
XTrace keep their sketch and extend it; Hutchinson continues the probe sequence). A
checkpoint of adaptive mode saves the round at its start and the round's run as it goes,
so a resumed adaptive run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hvp import tree as tu
from hvp.linalg._blocks import HIGHEST, combine, gram, rowwise
from hvp.linalg._checks import (
    DtypePolicy,
    acc_dtype,
    check_finite_float,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
    raise_if_nonfinite,
    resolve_chunk,
    warn_not_converged,
)
from hvp.linalg._driver import (
    Checkpoint,
    CheckpointMismatchError,
    Progress,
    StateMachine,
    as_checkpoint,
    check_checkpoint_path,
    fingerprint,
    load_state,
    read_checkpoint_meta,
    remove_checkpoint,
    resolve_driver,
    run,
    save_state,
)
from hvp.linalg._probes import probes, unit_block
from hvp.linalg._stats import mean_std_error as _mean_se
from hvp.linalg._stats import normal_quantile as _normal_quantile
from hvp.typing import OperatorLike, PRNGKey

__all__ = ["TRACE_METHODS", "TraceResult", "resolve_trace_method", "trace"]

PyTree = Any

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
_MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 2}
_ALIASES = {"hutchpp": "hutch++", "hutch_plus_plus": "hutch++", "girard": "hutchinson"}


def resolve_trace_method(method: str, *, argument: str = "method") -> tuple[str, int]:
    """The canonical name of a trace method and the fewest products it accepts.

    Names are case-insensitive; ``"hutchpp"`` and ``"hutch_plus_plus"`` mean ``"hutch++"``,
    ``"girard"`` means ``"hutchinson"``. The methods are :data:`TRACE_METHODS`.

    Args:
      method: the name to resolve.
      argument: the caller's parameter name, for the error messages (e.g. ``"trace_method"``).

    Returns:
      ``(name, min_matvecs)``: one of :data:`TRACE_METHODS` and the smallest ``num_matvecs``
      :func:`trace` accepts for it (1, 3 and 2).

    Raises:
      TypeError: ``method`` is not a string.
      ValueError: an unknown method (the message lists the known ones).

    Examples:
        >>> from hvp.linalg import TRACE_METHODS, resolve_trace_method
        >>> TRACE_METHODS
        ('hutchinson', 'hutch++', 'xtrace')
        >>> resolve_trace_method("HutchPP")
        ('hutch++', 3)
    """
    if not isinstance(method, str):
        raise TypeError(
            f"`{argument}` must be a string, one of {TRACE_METHODS}; got {type(method).__name__}."
        )
    name = _ALIASES.get(method.lower(), method.lower())
    if name not in TRACE_METHODS:
        raise ValueError(
            f"Unknown `{argument}` {method!r}; choose one of "
            f"{', '.join(repr(m) for m in TRACE_METHODS)}."
        )
    return name, _MIN_MATVECS[name]


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@tu.result(static=("num_matvecs", "method", "converged", "dtype_policy"))
class TraceResult:
    """Estimate of :math:`\\operatorname{tr}(A)`.

    Attributes:
      estimate: the trace estimate (scalar array).
      std_error: its standard error (scalar array; ``inf`` when it cannot be
        estimated from a single sample, ``0`` for ``method="exact"``).
      num_matvecs: operator products spent (all rounds of adaptive mode included); a
        Python ``int``, also under ``jax.jit`` (a fixed budget fixes the count).
      method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"exact"``.
      samples: per-sample values whose mean is ``estimate``: the i.i.d. values
        :math:`z_i^\\top A z_i` (Hutchinson), :math:`\\operatorname{tr}(Q^\\top A Q) +
        g_j^\\top P A P g_j` (Hutch++), the leave-one-out estimates :math:`t_i`
        (XTrace), or the diagonal entries (exact; their *sum* is the estimate).
      converged: adaptive mode only: whether ``std_error <= max(rtol*|estimate|, atol)``
        was reached within ``max_matvecs`` (``True`` for an exact result); ``None`` for a
        fixed budget.
      dtype_policy: the :class:`~hvp.linalg.DtypePolicy` used (products in ``compute``,
        sums, Gram matrices and factorisations in ``accumulate``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> res = hvp.trace(hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0, 3.0]))), key=jax.random.key(0), num_matvecs=3)
      >>> res.method, round(float(res.estimate), 4), float(res.std_error)
      ('exact', 6.0, 0.0)
    """

    estimate: jax.Array
    std_error: jax.Array
    num_matvecs: int
    method: str
    samples: jax.Array
    converged: bool | None = None
    dtype_policy: DtypePolicy | None = None

    def confidence_interval(self, level: float = 0.95) -> tuple[jax.Array, jax.Array]:
        """Normal-approximation interval ``estimate -+ z_{(1+level)/2} * std_error``."""
        z = _normal_quantile(level)
        return self.estimate - z * self.std_error, self.estimate + z * self.std_error

    @property
    def relative_std_error(self) -> jax.Array:
        """``std_error / |estimate|`` (``inf`` for a zero estimate)."""
        return jnp.where(self.estimate != 0, self.std_error / jnp.abs(self.estimate), jnp.inf)


def _eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def _acc(x):
    return x.astype(tu.accumulation_dtype(x.dtype))


# ------------------------------------------------------------------------------------------------
# blocks: rows, padding, orthonormalisation in the k x k Gram space
# ------------------------------------------------------------------------------------------------
def _rows(block, lo: int, hi: int):
    """Rows ``lo:hi`` (static) of a block."""
    return tu.map(lambda x: x[lo:hi], block)


def _put_rows(block, start, rows):
    """``block`` with rows ``start, start+1, ...`` replaced by ``rows`` (cast to its dtypes)."""
    return tu.map(
        lambda b, r: lax.dynamic_update_slice_in_dim(b, r.astype(b.dtype), start, axis=0),
        block,
        rows,
    )


def _zeros(like, k: int, dtype=None):
    """A block of ``k`` zero rows shaped like ``like`` (in ``dtype``, else ``like``'s dtypes)."""
    return tu.map(lambda x: jnp.zeros((k, *jnp.shape(x)), dtype or jnp.result_type(x)), like)


def _padded(block, k: int, like, dtype=None):
    """``block`` (``j <= k`` rows, or ``None``) followed by zero rows up to ``k`` rows."""
    out = _zeros(like, k, dtype)
    return out if block is None else _put_rows(out, 0, block)


def _svqb(g: jax.Array, tol: float):
    """Coefficients ``C`` with ``(X C)^T (X C) = I`` on the kept directions (SVQB).

    ``g = X^T X``. The columns are first scaled to unit norm, then
    ``C = D V diag(lambda^{-1/2})`` from the eigendecomposition of ``D G D``;
    directions with ``lambda <= tol * lambda_max`` get a zero column.
    """
    g = 0.5 * (g + g.T)
    diag = jnp.diagonal(g)
    d = jnp.where(diag > 0, 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 0.0)
    lam, vecs = jnp.linalg.eigh(d[:, None] * g * d[None, :])
    lam_max = jnp.max(lam)
    keep = (lam > tol * lam_max) & (lam_max > 0)
    inv = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    return d[:, None] * vecs * inv[None, :], keep


def _orthonormalize(ys):
    """An orthonormal basis of the span of the block ``ys`` (``k`` rows), without raveling.

    Returns ``(Q, C, rank)`` with ``Q = ys @ C`` (``Q`` has ``k`` rows, the
    dropped, numerically dependent directions being zero rows) and ``rank`` the
    number of non-zero rows. Two passes of SVQB (Stathopoulos & Wu 2002) in the ``k x k``
    Gram space.
    """
    k = tu.leading_dim(ys)
    tol = 10.0 * k * _eps(acc_dtype(ys))
    c1, _ = _svqb(gram(ys, ys), tol)
    q1 = combine(c1, ys)
    c2, keep = _svqb(gram(q1, q1), tol)
    q = combine(c2, q1)
    return q, jnp.matmul(c1, c2, precision=HIGHEST), jnp.sum(keep).astype(jnp.int32)


def _extend_basis(q_old, ys):
    """Orthonormal ``Q_add`` spanning ``(I - Q_old Q_old^T) ys`` (block Gram-Schmidt, twice).

    Returns ``(Q_add, B, C_add, rank_add)`` with ``Q_add = (ys - Q_old B) C_add``.
    ``q_old=None`` orthonormalises ``ys`` itself (``B = None``).
    """
    if q_old is None:
        q, c, rank = _orthonormalize(ys)
        return q, None, c, rank
    b1 = gram(q_old, ys)
    r1 = tu.sub(tu.map(_acc, ys), combine(b1, q_old))
    b2 = gram(q_old, r1)
    r2 = tu.sub(r1, combine(b2, q_old))
    q, c, rank = _orthonormalize(r2)
    return q, b1 + b2, c, rank


def _host_mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, math.inf
    se = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.inf
    return float(np.mean(v)), se


def _progress_text(est: float, se: float) -> str:
    if not math.isfinite(est):
        return ""
    return f"trace {est:.6g} ± {se:.2g}" if math.isfinite(se) else f"trace {est:.6g}"


def _next_phase(remaining, step: int, tail_phase: int, full_phase: int):
    return jnp.where(remaining >= step, full_phase, tail_phase).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# the state machines
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Hutchinson(StateMachine):
    """Hutchinson's estimator: steps of ``step`` Rademacher probes, then a tail of the rest.

    Probe ``start + i`` comes from ``fold_in(key, start + i)``, so the samples do not
    depend on ``step``, ``chunk`` or the driver. ``start`` (in the state) lets adaptive
    rounds continue the same sequence. ``total``: the products of the whole run when known
    (progress), ``None`` in adaptive mode.
    """

    name: ClassVar[str] = "trace (hutchinson)"
    count: int
    step: int
    chunk: int
    total: int | None = None

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return (self.step, self.count % self.step)

    @property
    def chunk_size(self) -> int:
        return self.chunk

    def prepare(self, op, state, phase):
        size = self.block_sizes[phase]
        if size == 0:  # a tail phase that this run never reaches
            return _zeros(op.like, 0)
        return probes(
            state["key"], op.like, size, "rademacher", start=state["start"] + state["pos"]
        )

    def update(self, op, state, phase, vs, avs):  # noqa: ARG002
        size = self.block_sizes[phase]
        if size == 0:
            return state
        samples = lax.dynamic_update_slice_in_dim(
            state["samples"], rowwise(vs, avs).astype(state["samples"].dtype), state["pos"], axis=0
        )
        pos = state["pos"] + size
        return dict(
            state,
            samples=samples,
            pos=pos,
            matvecs=state["matvecs"] + size,
            phase=_next_phase(self.count - pos, self.step, 1, 0),
            done=pos >= self.count,
        )

    def finalize(self, op, state):  # noqa: ARG002
        est, se = _mean_se(state["samples"])
        return est, se, state["samples"], state["matvecs"]

    def progress(self, state) -> Progress:
        est, se = _host_mean_se(np.asarray(state["samples"])[: int(state["pos"])])
        return Progress(
            matvecs=int(state["matvecs"]), total=self.total, text=_progress_text(est, se)
        )


@partial(jax.jit, static_argnames=("count",))
def _hutchinson_state(key, like, count: int, start, matvecs):
    return dict(
        key=key,
        start=jnp.asarray(start, jnp.int32),
        pos=jnp.zeros((), jnp.int32),
        samples=jnp.zeros((count,), acc_dtype(like)),
        matvecs=jnp.asarray(matvecs, jnp.int32),
        phase=jnp.zeros((), jnp.int32),
        done=jnp.array(False),
    )


@dataclasses.dataclass(frozen=True)
class HutchPP(StateMachine):
    """Hutch++ (Meyer et al. 2021), one round: sketch ``S``, then ``Q``, then residual probes.

    Phase 0 multiplies the ``k - k_old`` new sketch probes (``A S``) and extends the
    orthonormal basis ``Q`` (rows ``k_old:k``); phase 1 multiplies the new basis vectors
    (``Z = A Q``) and, with ``keep``, updates the kept residual probes for the larger basis
    without products; phases 2 and 3 multiply the deflated residual probes
    ``(I - Q Q^T) g_j``, ``rstep`` at a time, then the tail.

    ``keep=False`` (a fixed budget) only keeps the residual samples (streaming, ``rstep``
    = the chunk size); ``keep=True`` (adaptive rounds) keeps the deflated probes and their
    products, in one block, so that a later round can extend the sketch and update them.
    """

    name: ClassVar[str] = "trace (hutch++)"
    k_old: int
    k: int
    r_old: int
    r: int
    chunk: int
    keep: bool = False
    total: int | None = None

    @property
    def rstep(self) -> int:
        new = self.r - self.r_old
        return new if self.keep else min(self.chunk, new)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        new_k, new_r = self.k - self.k_old, self.r - self.r_old
        return (new_k, new_k, self.rstep, new_r % self.rstep if self.rstep else 0)

    @property
    def chunk_size(self) -> int:
        return self.chunk

    def first_phase(self) -> int:
        return 0 if self.k > self.k_old else 2

    def prepare(self, op, state, phase):
        size = self.block_sizes[phase]
        if size == 0:  # a tail phase that this run never reaches
            return _zeros(op.like, 0)
        if phase == 0:
            key_s, _ = jax.random.split(state["key"])
            return probes(key_s, op.like, size, "rademacher", start=self.k_old)
        if phase == 1:
            return _rows(state["q"], self.k_old, self.k)
        _, key_g = jax.random.split(state["key"])
        g = probes(key_g, op.like, size, "rademacher", start=self.r_old + state["rpos"])
        q = state["q"]
        return tu.sub(tu.map(_acc, g), combine(gram(q, g), q))  # (I - Q Q^T) g

    def update(self, op, state, phase, vs, avs):  # noqa: ARG002
        size = self.block_sizes[phase]
        if size == 0:
            return state
        if phase == 0:
            q_old = _rows(state["q"], 0, self.k_old) if self.k_old else None
            q_add, _, _, _ = _extend_basis(q_old, avs)
            return dict(
                state,
                q=_put_rows(state["q"], self.k_old, q_add),
                matvecs=state["matvecs"] + size,
                phase=jnp.ones((), jnp.int32),
            )
        if phase == 1:
            q_add = vs
            z = _put_rows(state["z"], self.k_old, avs)
            new = dict(state, z=z, matvecs=state["matvecs"] + size)
            new["low"] = jnp.sum(rowwise(state["q"], z)).astype(state["low"].dtype)  # tr(Q^T A Q)
            if self.keep and self.r_old:
                pg, apg = _rows(state["pg"], 0, self.r_old), _rows(state["apg"], 0, self.r_old)
                coeffs = gram(q_add, pg)  # (k_add, r_old): Q_add^T P g_j
                pg = tu.sub(tu.map(_acc, pg), combine(coeffs, q_add))
                apg = tu.sub(tu.map(_acc, apg), combine(coeffs, tu.map(_acc, avs)))
                new["pg"] = _put_rows(state["pg"], 0, pg)
                new["apg"] = _put_rows(state["apg"], 0, apg)
            more = self.r > self.r_old
            new["phase"] = jnp.asarray(2 if more else 1, jnp.int32)
            new["done"] = jnp.array(not more)
            return new
        new = dict(state, matvecs=state["matvecs"] + size)
        at = self.r_old + state["rpos"]
        if self.keep:
            new["pg"] = _put_rows(state["pg"], at, vs)
            new["apg"] = _put_rows(state["apg"], at, avs)
        else:
            vals = rowwise(vs, avs).astype(state["resid"].dtype)
            new["resid"] = lax.dynamic_update_slice_in_dim(state["resid"], vals, at, axis=0)
        rpos = state["rpos"] + size
        new["rpos"] = rpos
        new["phase"] = _next_phase(self.r - self.r_old - rpos, self.rstep, 3, 2)
        new["done"] = rpos >= self.r - self.r_old
        return new

    def finalize(self, op, state):  # noqa: ARG002
        resid = rowwise(state["pg"], state["apg"]) if self.keep else state["resid"]
        _, se = _mean_se(resid)
        samples = state["low"] + resid
        carry = state if self.keep else None
        return jnp.mean(samples), se, samples, state["matvecs"], carry

    def progress(self, state) -> Progress:
        rpos = int(state["rpos"])
        text = ""
        if rpos and not self.keep:
            resid = np.asarray(state["resid"])[: self.r_old + rpos]
            est, se = _host_mean_se(float(state["low"]) + resid)
            text = _progress_text(est, se)
        return Progress(matvecs=int(state["matvecs"]), total=self.total, text=text)


@partial(jax.jit, static_argnums=0)
def _hutchpp_state(alg: HutchPP, key, like, carry, matvecs):
    acc = acc_dtype(like)
    state = dict(
        key=key,
        q=_padded(None if carry is None else carry["q"], alg.k, like, acc),
        z=_padded(None if carry is None else carry["z"], alg.k, like, acc),
        low=jnp.zeros((), acc) if carry is None else carry["low"],
        rpos=jnp.zeros((), jnp.int32),
        matvecs=jnp.asarray(matvecs, jnp.int32),
        phase=jnp.asarray(alg.first_phase(), jnp.int32),
        done=jnp.array(False),
    )
    if alg.keep:
        state["pg"] = _padded(None if carry is None else carry["pg"], alg.r, like, acc)
        state["apg"] = _padded(None if carry is None else carry["apg"], alg.r, like, acc)
    else:
        state["resid"] = jnp.zeros((alg.r,), acc)
    return state


@dataclasses.dataclass(frozen=True)
class XTrace(StateMachine):
    """XTrace (Epperly, Tropp & Webber 2024), one round: ``A Omega``, then ``A Q``.

    Phase 0 multiplies the ``p - p_old`` new Gaussian probes (drawn into the initial state,
    rows ``p_old:p`` of ``omega``) and extends the orthonormal basis of the shifted sketch
    ``(A + delta I) Omega`` by block Gram-Schmidt (``delta`` is fixed by the first round);
    phase 1 multiplies the new basis vectors. :func:`_xtrace_finish` turns the state into
    the leave-one-out samples without products. ``shift``: ``delta``'s relative size
    (``None``: ``10 sqrt(eps)``).
    """

    name: ClassVar[str] = "trace (xtrace)"
    p_old: int
    p: int
    chunk: int
    n: int
    jackknife: bool = True
    shift: float | None = None
    keep: bool = False
    total: int | None = None

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return (self.p - self.p_old, self.p - self.p_old)

    @property
    def chunk_size(self) -> int:
        return self.chunk

    def prepare(self, op, state, phase):  # noqa: ARG002
        block = state["omega"] if phase == 0 else state["q"]
        return _rows(block, self.p_old, self.p)

    def update(self, op, state, phase, vs, avs):
        size = self.p - self.p_old
        if phase == 1:
            return dict(
                state,
                z=_put_rows(state["z"], self.p_old, avs),
                matvecs=state["matvecs"] + size,
                done=jnp.array(True),
            )
        acc = acc_dtype(op.like)
        if self.p_old == 0:
            shift = 10.0 * math.sqrt(_eps(acc)) if self.shift is None else self.shift
            delta = _xtrace_delta(vs, avs, shift).astype(acc)
        else:
            delta = state["delta"]
        ys = tu.map(lambda o, a: delta * _acc(o) + _acc(a), vs, avs)
        q_old = _rows(state["q"], 0, self.p_old) if self.p_old else None
        q_add, b, c_add, rank_add = _extend_basis(q_old, ys)
        if self.p_old == 0:
            c = c_add
        else:
            c_old = state["c"][: self.p_old, : self.p_old]
            top = jnp.concatenate([c_old, -(c_old @ b) @ c_add], axis=1)
            bottom = jnp.concatenate([jnp.zeros((size, self.p_old), c_add.dtype), c_add], axis=1)
            c = jnp.concatenate([top, bottom], axis=0)
        return dict(
            state,
            y=_put_rows(state["y"], self.p_old, avs),
            q=_put_rows(state["q"], self.p_old, q_add),
            c=c.astype(state["c"].dtype),
            rank=state["rank"] + rank_add,
            delta=delta,
            matvecs=state["matvecs"] + size,
            phase=jnp.ones((), jnp.int32),
        )

    def finalize(self, op, state):  # noqa: ARG002
        est, se, samples = _xtrace_finish(state, self.n, self.jackknife)
        return est, se, samples, state["matvecs"], state if self.keep else None

    def progress(self, state) -> Progress:
        return Progress(matvecs=int(state["matvecs"]), total=self.total)


@partial(jax.jit, static_argnums=0)
def _xtrace_state(alg: XTrace, omega_new, like, carry, matvecs):
    acc = acc_dtype(like)
    omega = _padded(None if carry is None else carry["omega"], alg.p, like)
    c = jnp.zeros((alg.p, alg.p), acc)
    if carry is not None:
        c = c.at[: alg.p_old, : alg.p_old].set(carry["c"])
    return dict(
        omega=_put_rows(omega, alg.p_old, omega_new),
        y=_padded(None if carry is None else carry["y"], alg.p, like),
        q=_padded(None if carry is None else carry["q"], alg.p, like, acc),
        z=_padded(None if carry is None else carry["z"], alg.p, like),
        c=c,
        rank=jnp.zeros((), jnp.int32) if carry is None else carry["rank"],
        delta=jnp.zeros((), acc) if carry is None else carry["delta"],
        matvecs=jnp.asarray(matvecs, jnp.int32),
        phase=jnp.zeros((), jnp.int32),
        done=jnp.array(False),
    )


@dataclasses.dataclass(frozen=True)
class ExactTrace(StateMachine):
    """The exact trace from the ``n`` products ``e_i^T A e_i``, ``step`` unit vectors at a time."""

    name: ClassVar[str] = "trace (exact)"
    n: int
    step: int
    total: int | None = None

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return (self.step, self.n % self.step)

    @property
    def chunk_size(self) -> int:
        return self.step

    def prepare(self, op, state, phase):
        size = self.block_sizes[phase]
        if size == 0:  # a tail phase that this run never reaches
            return _zeros(op.like, 0)
        return unit_block(op.like, state["pos"], size)

    def update(self, op, state, phase, vs, avs):  # noqa: ARG002
        size = self.block_sizes[phase]
        if size == 0:
            return state
        diag = lax.dynamic_update_slice_in_dim(
            state["diag"], rowwise(vs, avs).astype(state["diag"].dtype), state["pos"], axis=0
        )
        pos = state["pos"] + size
        return dict(
            state,
            diag=diag,
            pos=pos,
            matvecs=state["matvecs"] + size,
            phase=_next_phase(self.n - pos, self.step, 1, 0),
            done=pos >= self.n,
        )

    def finalize(self, op, state):  # noqa: ARG002
        diag = state["diag"]
        return jnp.sum(diag), jnp.zeros((), diag.dtype), diag, state["matvecs"]

    def progress(self, state) -> Progress:
        pos = int(state["pos"])
        text = f"partial trace {float(np.sum(np.asarray(state['diag'])[:pos])):.6g}" if pos else ""
        return Progress(matvecs=int(state["matvecs"]), total=self.total, text=text)


@partial(jax.jit, static_argnames=("count", "kind"))
def _draw(key, like, start=0, *, count: int, kind: str):
    """Probes ``start..start+count-1`` (one compiled call: drawing them eagerly is slow)."""
    return probes(key, like, count, kind, start=start)


@partial(jax.jit, static_argnames=("n",))
def _exact_state(like, n: int, matvecs):
    return dict(
        pos=jnp.zeros((), jnp.int32),
        diag=jnp.zeros((n,), acc_dtype(like)),
        matvecs=jnp.asarray(matvecs, jnp.int32),
        phase=jnp.zeros((), jnp.int32),
        done=jnp.array(False),
    )


# ------------------------------------------------------------------------------------------------
# XTrace: the leave-one-out samples and the jackknife from the final state (no products)
# ------------------------------------------------------------------------------------------------
def _xtrace_delta(omega, y, shift):
    """``delta = shift * ||Y||_2 / sigma_min(Omega)`` for the shifted sketch ``Y + delta Omega``."""
    g_y = gram(y, y)
    g_o = gram(omega, omega)
    s_max_y = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(0.5 * (g_y + g_y.T))[-1], 0.0))
    s_min_o = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(0.5 * (g_o + g_o.T))[0], 0.0))
    return shift * s_max_y / jnp.where(s_min_o > 0, s_min_o, 1.0)


def _xtrace_finish(state, n: int, jackknife: bool):
    omega, y, q, c, rank, z = (state[k] for k in ("omega", "y", "q", "c", "rank", "z"))
    dtype = c.dtype
    h = gram(q, z)
    h = 0.5 * (h + h.T)  # Q^T A Q
    w = gram(q, omega)  # W[:, i] = Q^T omega_i
    r = gram(q, y)  # R[:, i] = Q^T A omega_i
    oy = rowwise(omega, y)  # omega_i^T A omega_i
    oo = rowwise(omega, omega)  # ||omega_i||^2
    # s_i: the unit vector (in Q coordinates) that range(Q) loses when omega_i is left out:
    # orthogonal to Q^T y'_j for all j != i, i.e. the i-th row of C = R'^{-1}.
    s = c.T
    s_norm = jnp.linalg.norm(s, axis=0)
    s = jnp.where(s_norm > 0, s / jnp.where(s_norm > 0, s_norm, 1.0), 0.0)
    ss = jnp.sum(s * s, axis=0)  # 1, or 0 where nothing is lost
    hs, hw = h @ s, h @ w
    sw, sr = jnp.sum(s * w, axis=0), jnp.sum(s * r, axis=0)
    shs, shw = jnp.sum(s * hs, axis=0), jnp.sum(s * hw, axis=0)
    whw, wr, ww = jnp.sum(w * hw, axis=0), jnp.sum(w * r, axis=0), jnp.sum(w * w, axis=0)
    # u_i = (I - P_i) omega_i = omega_i + Q v_i with v_i = -(w_i - s_i (s_i^T w_i)):
    # u^T A u = omega^T A omega + 2 v^T Q^T A omega + v^T H v.
    quad = oy - 2.0 * wr + 2.0 * sw * sr + whw - 2.0 * sw * shw + sw**2 * shs
    norm_u2 = oo - ww + sw**2  # ||(I - P_i) omega_i||^2
    dim = n - (rank.astype(dtype) - ss)  # n - rank(P_i)
    scale = dim / jnp.where(norm_u2 > 0, norm_u2, 1.0)
    scale = jnp.where(norm_u2 > 0, scale, 0.0)
    samples = jnp.trace(h) - shs + scale * quad
    est = jnp.mean(samples)
    if jackknife:
        se = _xtrace_jackknife_se(h, s, w, r, oy, oo, whw, wr, ww, rank.astype(dtype), n)
    else:
        _, se = _mean_se(samples)
    return est, se, samples


def _xtrace_jackknife_se(h, s, w, r, oy, oo, whw, wr, ww, rank, n: int):
    """Jackknife standard error of XTrace from its leave-one-probe-out estimates.

    ``theta_{-j}`` is XTrace on the probes without ``omega_j``: its terms need the
    projectors onto ``range(A Omega_{-i,-j})``, i.e. ``P_i`` further downdated by
    ``s_j`` (the lost subspace is ``span(s_i, s_j)``), all from ``m x m``
    matrices (``O(m^3)``, no products). The jackknife variance
    ``(m-1)/m sum_j (theta_{-j} - mean)^2`` is conservative in expectation
    (Efron & Stein 1981), unlike ``std(t_i)/sqrt(m)``, which ignores the
    positive correlation of the ``t_i``.
    """
    m = s.shape[1]
    if m < 2:
        return jnp.full((), jnp.inf, h.dtype)
    sig = s.T @ s  # [a, b] = s_a . s_b
    shs = s.T @ (h @ s)  # s_a^T H s_b
    sw = s.T @ w  # s_a . w_b
    sr = s.T @ r  # s_a . r_b
    shw = s.T @ (h @ w)  # s_a^T H w_b
    col = lambda v: v[:, None]  # noqa: E731  (index i: the probe whose residual is used)
    row = lambda v: v[None, :]  # noqa: E731  (index j: the probe left out)
    g11, g22, g12 = col(jnp.diagonal(sig)), row(jnp.diagonal(sig)), sig
    det = g11 * g22 - g12**2
    ok = det > 1e-12
    inv_det = jnp.where(ok, 1.0 / jnp.where(ok, det, 1.0), 0.0)
    bw1, bw2 = col(jnp.diagonal(sw)), sw.T  # s_i . w_i, s_j . w_i
    br1, br2 = col(jnp.diagonal(sr)), sr.T
    bh1, bh2 = col(jnp.diagonal(shw)), shw.T
    m11, m22, m12 = col(jnp.diagonal(shs)), row(jnp.diagonal(shs)), shs
    a1 = (g22 * bw1 - g12 * bw2) * inv_det  # alpha = (B^T B)^{-1} B^T w_i, B = [s_i, s_j]
    a2 = (g11 * bw2 - g12 * bw1) * inv_det
    tr_bhb = (g22 * m11 - 2.0 * g12 * m12 + g11 * m22) * inv_det
    vr = -col(wr) + a1 * br1 + a2 * br2  # v = -w_i + B alpha
    vhv = col(whw) - 2.0 * (a1 * bh1 + a2 * bh2) + a1**2 * m11 + 2.0 * a1 * a2 * m12 + a2**2 * m22
    quad = col(oy) + 2.0 * vr + vhv
    norm_u2 = col(oo) - col(ww) + (a1 * bw1 + a2 * bw2)
    dim = n - (rank - jnp.where(ok, 2.0, 0.0))
    scale = jnp.where(norm_u2 > 0, dim / jnp.where(norm_u2 > 0, norm_u2, 1.0), 0.0)
    t = jnp.trace(h) - tr_bhb + scale * quad  # t[i, j]: term i of XTrace without probe j
    off = 1.0 - jnp.eye(m, dtype=t.dtype)
    theta = jnp.sum(t * off, axis=0) / (m - 1)  # theta_{-j}
    return jnp.sqrt((m - 1) / m * jnp.sum((theta - jnp.mean(theta)) ** 2))


# ------------------------------------------------------------------------------------------------
# building and running the machines
# ------------------------------------------------------------------------------------------------
def _fixed_machine(op, key, method: str, m: int, chunk: int, jackknife: bool):
    """``(machine, initial state, method name, products)`` for a fixed budget of ``m``."""
    n, like = op.size, op.like
    if m >= n:
        return ExactTrace(n=n, step=min(chunk, n), total=n), _exact_state(like, n, 0), "exact", n
    if method == "hutchinson":
        alg = Hutchinson(count=m, step=min(chunk, m), chunk=chunk, total=m)
        return alg, _hutchinson_state(key, like, m, 0, 0), method, m
    if method == "hutch++":
        k = m // 3
        alg = HutchPP(k_old=0, k=k, r_old=0, r=m - 2 * k, chunk=chunk, total=m)
        return alg, _hutchpp_state(alg, key, like, None, 0), method, m
    p = m // 2
    alg = XTrace(p_old=0, p=p, chunk=chunk, n=n, jackknife=jackknife, total=2 * p)
    omega = _draw(key, like, count=p, kind="normal")
    return alg, _xtrace_state(alg, omega, like, None, 0), method, 2 * p


def _xtrace_round(
    op,
    omega_new,
    carry=None,
    *,
    shift: float | None = None,
    jackknife: bool = True,
    chunk: int | None = None,
    driver: str = "compiled",
    progress: bool | None = False,
):
    """XTrace on ``carry``'s probes plus the block ``omega_new``: ``(est, se, samples, carry)``.

    The building block of adaptive XTrace (each round extends the sketch, reusing every
    earlier product) and of the tests against brute force (given probes, ``shift=0``).
    """
    p_old = 0 if carry is None else tu.leading_dim(carry["omega"])
    p = p_old + tu.leading_dim(omega_new)
    alg = XTrace(
        p_old=p_old, p=p, chunk=chunk or p, n=op.size, jackknife=jackknife, shift=shift, keep=True
    )
    state = _xtrace_state(
        alg, omega_new, op.like, carry, 0 if carry is None else int(carry["matvecs"])
    )
    (est, se, samples, _, state), _ = run(
        alg, op, state, driver=driver, progress=progress, consume=True
    )
    return est, se, samples, state


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def trace(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    rtol: float | None = None,
    atol: float | None = None,
    max_matvecs: int | None = None,
    chunk_size: int | None = None,
    error_estimate: str = "jackknife",
    like: PyTree | None = None,
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
) -> TraceResult:
    r"""Estimate :math:`\operatorname{tr}(A)` from matrix-vector products.

    Args:
      op: a :class:`~hvp.LinearOperator` (e.g. :func:`hvp.hessian`), a
        ``matvec`` callable (then pass ``like=``), or a dense square matrix.
      key: a JAX PRNG key (``jax.random.key(0)``; an old-style ``jax.random.PRNGKey`` is
        accepted too); the same key gives the same result, whatever ``chunk_size`` and
        ``driver``.
      num_matvecs: number of operator products (the budget). Methods:
        ``"hutchinson"`` needs >= 1, ``"hutch++"`` >= 3 (``k = m // 3`` for the
        sketch, ``k`` for :math:`AQ`, ``m - 2k`` for the residual),
        ``"xtrace"`` >= 2 (``m // 2`` Gaussian probes, two products each). With
        ``num_matvecs >= n`` the exact trace is computed from ``n`` products
        (``method="exact"``). In adaptive mode this is the round size.
      method: ``"hutchinson"`` (Hutchinson 1989, Rademacher probes), ``"hutch++"``
        (Meyer et al. 2021) or ``"xtrace"`` (Epperly, Tropp & Webber 2024); see
        the module docstring for the formulas and their standard errors, and
        :func:`resolve_trace_method` for the accepted spellings.
      rtol: adaptive mode (``rtol`` or ``atol`` turns it on): stop as soon as
        ``std_error <= max(rtol * |estimate|, atol)``. Hutchinson runs rounds
        of ``num_matvecs`` new probes and pools all samples; Hutch++ and XTrace
        double their total budget each round and extend their sketch, reusing
        every earlier product (``num_matvecs`` in the result is the total
        spent). A round that would bring the total to ``n`` products or more,
        or an error that predicts ``n`` or more are needed, switches to the
        exact trace (``n`` products, ``method="exact"``, ``std_error=0``): the
        random rounds never spend ``n`` products without returning the exact value.
        Must be finite and ``>= 0``.
      atol: absolute tolerance of adaptive mode (finite, ``>= 0``), see ``rtol``.
      max_matvecs: adaptive mode only: the cap on the total number of products
        (default ``50 * num_matvecs``). ``converged`` reports whether the
        tolerance was met.
      chunk_size: at most this many products run at once. ``None`` (default) chooses it by
        the memory rule of :func:`hvp.linalg._checks.default_chunk_size`: at most 8 products
        at once (one product of a curvature operator over a data set holds that data set's
        activations). Hutchinson and the exact path take ``chunk_size`` probes (unit vectors)
        per step; Hutch++ multiplies its sketch ``S``, then ``Q``, then its residual probes
        ``chunk_size`` at a time (three block products when ``chunk_size`` is at least the
        residual count ``m - 2 (m // 3)``); XTrace its probes ``\Omega``, then ``Q`` (two
        block products), each block split into chunks of ``chunk_size``. Results do not depend on
        it (probe ``i`` always comes from ``fold_in(key, i)``).
      error_estimate: how XTrace's standard error is computed (for Hutchinson
        and Hutch++ both choices give the same number, the sample standard
        deviation of ``samples`` over the square root of their number, since
        those estimates are linear in i.i.d. samples). ``"jackknife"``
        (default): the jackknife over probes, conservative (measured 1.1-3x
        larger than the true spread, the larger factors on fast-decaying
        spectra). ``"sample"``: the paper's ``std(t_i)/sqrt(m/2)``, which ignores
        the positive correlation of the leave-one-out :math:`t_i` (measured
        1.2-1.4x too small on decaying spectra, with occasional misses of 5+
        standard errors).
      like: example pytree of the vectors when ``op`` is a plain callable.
      driver: ``"auto"`` (compiled inside ``jax.jit``/``vmap``, host otherwise), ``"compiled"``
        or ``"host"``; see :mod:`hvp.linalg` ("Drivers"). Both give the same numbers.
      progress: host driver: show the products, the current estimate ``± std_error`` and the
        time left on stderr (``None``: when stderr is a terminal). Adaptive mode shows one
        display per round.
      checkpoint: host driver: a path or :class:`hvp.linalg.Checkpoint` to save the state to
        and resume from (same arguments, same result, bit for bit). In adaptive mode the file
        holds the current round (its sketch, kept probes and pooled samples, saved at the
        start of each round) and a second file, ``path + ".round"``, the round's progress
        (saved every ``Checkpoint.every`` steps); both are removed when the run ends.

    Returns:
      :class:`TraceResult` with ``estimate``, ``std_error``, ``num_matvecs`` (a Python
      ``int``, also under ``jax.jit``: a fixed budget fixes the count), ``method``,
      ``samples``, ``converged``, ``dtype_policy`` and ``confidence_interval(level)``.
      Precision: products run in the parameters' dtype (bfloat16/float16 included); probe
      dot products, Gram matrices and the small ``eigh`` factorisations run in at least
      float32.

    Raises:
      ValueError / TypeError: bad budget, method, tolerance, key, driver or checkpoint, with
        the fix.
      hvp.NonFiniteError: the products produced NaN or Inf (outside ``jax.jit``; under it the
        estimate is NaN instead).

    Warns:
      ConvergenceWarning: (:class:`hvp.ConvergenceWarning`) adaptive mode spent ``max_matvecs``
        without meeting its tolerance (``converged=False``); the message gives the standard
        error reached against the tolerance, the products and what can help.

    A fixed budget works inside ``jax.jit`` and ``jax.vmap`` (the compiled driver; pass the
    operator as an argument); adaptive mode decides on concrete values between rounds and
    runs outside them.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> A = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
        >>> res = hvp.trace(hvp.from_dense(A), key=jax.random.PRNGKey(0), num_matvecs=6, method="hutch++")
        >>> round(float(res.estimate), 4)  # a budget of at least n products is exact: 2 + 3 + 4
        9.0
    """
    op = coerce_operator(op, like)
    check_key(key)
    method, least = resolve_trace_method(method)
    num_matvecs = check_int(
        "num_matvecs",
        num_matvecs,
        minimum=least,
        hint=f"Method {method!r} needs at least {least} products.",
    )
    chunk = resolve_chunk(chunk_size, max(min(num_matvecs, op.size), 1))
    if error_estimate not in ("sample", "jackknife"):
        raise ValueError(
            f"`error_estimate` must be 'sample' or 'jackknife', got {error_estimate!r}."
        )
    jackknife = error_estimate == "jackknife"
    adaptive = rtol is not None or atol is not None
    if not adaptive:
        if max_matvecs is not None:
            raise ValueError(
                "`max_matvecs` only applies in adaptive mode: pass `rtol=` (and/or `atol=`) too, "
                "or set the budget with `num_matvecs=`."
            )
        alg, state, name, cost = _fixed_machine(op, key, method, num_matvecs, chunk, jackknife)
        out, _ = run(
            alg,
            op,
            state,
            driver=driver,
            progress=progress,
            checkpoint=checkpoint,
            traced=(key,),
            consume=True,
        )
        est, se, samples = out[:3]
        raise_if_nonfinite(op, "trace estimate", est)
        return TraceResult(
            estimate=est,
            std_error=se,
            num_matvecs=cost,
            method=name,
            samples=samples,
            dtype_policy=dtype_policy(op.like),
        )

    rtol = check_finite_float("rtol", rtol, allow_none=True)
    atol = check_finite_float("atol", atol, allow_none=True)
    rtol = 0.0 if rtol is None else rtol
    atol = 0.0 if atol is None else atol
    if rtol == 0.0 and atol == 0.0:
        raise ValueError(
            "Adaptive mode needs a positive `rtol` or `atol` (a zero tolerance never stops)."
        )
    max_matvecs = (
        50 * num_matvecs
        if max_matvecs is None
        else check_int(
            "max_matvecs", max_matvecs, minimum=num_matvecs, hint="It caps the total budget."
        )
    )
    if tu.is_traced(key, op):
        raise ValueError(
            "Adaptive mode (`rtol=`/`atol=`) decides on concrete values and cannot run inside "
            "`jax.jit`; call it outside, or use a fixed `num_matvecs`."
        )
    chunk = resolve_chunk(chunk_size, max(num_matvecs, 1))
    return _adaptive(
        op,
        key,
        method,
        num_matvecs,
        max_matvecs,
        rtol,
        atol,
        chunk,
        jackknife,
        driver,
        progress,
        checkpoint,
    )


def _met(est, se, rtol, atol) -> bool:
    return float(se) <= max(rtol * abs(float(est)), atol)


def _predicted_total(total: int, est, se, rtol, atol, power: float) -> float:
    """Products needed to reach the tolerance if the error falls like ``total^-power``."""
    target = max(rtol * abs(float(est)), atol)
    if not target > 0 or not math.isfinite(float(se)):
        return math.inf
    return total * (float(se) / target) ** (1.0 / power)


def _cost(method: str, num_matvecs: int) -> int:
    if method == "xtrace":
        return 2 * (num_matvecs // 2)
    return num_matvecs


@dataclasses.dataclass(frozen=True)
class _AdaptiveTrace:
    """What identifies an adaptive run in its checkpoint (the settings of all its rounds)."""

    name: ClassVar[str] = "trace (adaptive)"
    method: str
    batch: int
    max_matvecs: int
    rtol: float
    atol: float
    chunk: int
    jackknife: bool


_ROUND_MACHINES = {m.__name__: m for m in (Hutchinson, HutchPP, XTrace, ExactTrace)}


def _round_path(path) -> str:
    """The checkpoint of the current round's run, beside the adaptive run's own file."""
    return os.fspath(path) + ".round"


def _template(alg, key, like):
    """A state with the layout of a round of ``alg`` (to restore a saved round into)."""
    if isinstance(alg, Hutchinson):
        return _hutchinson_state(key, like, alg.count, 0, 0)
    if isinstance(alg, HutchPP):
        return _hutchpp_state(alg, key, like, None, 0)
    if isinstance(alg, XTrace):
        return _xtrace_state(alg, _zeros(like, alg.p - alg.p_old), like, None, 0)
    return _exact_state(like, alg.n, 0)


def _load_round(path, fp: dict, key, like):
    """``(machine, initial state, products before it, pooled samples)`` of the saved round."""
    meta = read_checkpoint_meta(path)
    if meta.get("algorithm") != fp["algorithm"] or meta.get("settings") != fp["settings"]:
        load_state(path, {"key": key}, fp)  # raises, naming what differs
    try:
        alg = _ROUND_MACHINES[meta["round_machine"]](**meta["round_settings"])
        total, pooled = int(meta["total"]), int(meta["pooled"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointMismatchError(
            f"The checkpoint {os.fspath(path)!r} has no valid description of its round "
            f"({type(err).__name__}: {err}). Delete it to start afresh."
        ) from err
    template = {
        "key": key,
        "round": _template(alg, key, like),
        "pooled": jnp.zeros((pooled,), acc_dtype(like)),
    }
    saved = load_state(path, template, fp)
    return alg, saved["round"], total, saved["pooled"] if pooled else None


def _adaptive(
    op, key, method, batch, max_matvecs, rtol, atol, chunk, jackknife, driver, progress, checkpoint
):
    """Adaptive rounds; every product is used once and the total never passes ``n`` unless exact.

    Each round is one run of a state machine (:class:`Hutchinson`, :class:`HutchPP` or
    :class:`XTrace` with ``keep=True``) by the chosen driver. Hutchinson pools rounds of
    ``batch`` new probes; Hutch++ and XTrace double their total budget each round and
    *extend* their sketch, reusing every earlier product (the round's machine starts from
    the previous round's state). Before a round, if it would bring the total to ``n`` or
    more, or if the error so far predicts that ``n`` or more products are needed
    (``1/sqrt(m)`` decay for Hutchinson, ``1/m`` for Hutch++ and XTrace), the exact trace
    is computed instead when ``max_matvecs`` allows it (``n`` more products); when it does
    not, rounds continue while their total stays below ``n``.

    **Checkpoints.** A round is fully described by its machine (static settings), its initial
    state (which holds everything carried over: the sketch, the kept probes and products,
    the probe counter) and, for Hutchinson, the samples pooled so far. At the start of each
    round these are saved atomically to ``checkpoint.path``; the round's own run saves its
    progress every ``checkpoint.every`` steps to ``checkpoint.path + ".round"``. Resuming
    restores the round and resumes its run, so the result equals an uninterrupted run bit
    for bit (every later decision is a function of these arrays). Both files go when the
    run ends.
    """
    n, like = op.size, op.like
    policy = dtype_policy(like)
    power = 0.5 if method == "hutchinson" else 1.0
    ckpt = as_checkpoint(checkpoint)
    inner = fp = resumed = None
    if ckpt is not None:
        resolve_driver(driver, op, key, progress=progress, checkpoint=ckpt)
        check_checkpoint_path(ckpt.path)
        inner = Checkpoint(_round_path(ckpt.path), ckpt.every)
        ident = _AdaptiveTrace(method, batch, max_matvecs, rtol, atol, chunk, jackknife)
        fp = fingerprint(ident, op, {"key": key}, traced=(key,))
        if os.path.exists(ckpt.path):
            resumed = _load_round(ckpt.path, fp, key, like)

    def finish(result):
        if ckpt is not None:
            remove_checkpoint(ckpt.path)
            remove_checkpoint(inner.path)
        return result

    total, carry, pooled, last = 0, None, None, None
    res = None
    while True:
        if resumed is not None:
            alg, state, total, pooled = resumed
            resumed = None
        else:
            k_old, r_old = (last.k, last.r) if isinstance(last, HutchPP) else (0, 0)
            p_old = last.p if isinstance(last, XTrace) else 0
            if total == 0:
                target = batch
            elif method == "hutchinson":
                target = total + min(batch, max_matvecs - total)
            else:
                target = min(2 * total, max_matvecs)
            if total > 0:
                predicted = _predicted_total(total, res.estimate, res.std_error, rtol, atol, power)
            else:
                predicted = 0.0
            exact_affordable = total + n <= max_matvecs
            if (target >= n or predicted >= n) and exact_affordable:
                alg = ExactTrace(n=n, step=min(chunk, n))
                state = _exact_state(like, n, total)
            elif target >= n or target <= total or _cost(method, target) <= total:
                break  # random rounds never reach n products: stop, unconverged
            elif method == "hutchinson":
                count = target - total
                alg = Hutchinson(count=count, step=min(chunk, count), chunk=chunk)
                state = _hutchinson_state(key, like, count, total, total)
            elif method == "hutch++":
                k = max(k_old, target // 3)
                r = target - 2 * k
                if r < r_old:
                    k, r = k_old, target - 2 * k_old
                alg = HutchPP(k_old=k_old, k=k, r_old=r_old, r=r, chunk=chunk, keep=True)
                state = _hutchpp_state(alg, key, like, carry, total)
            else:
                p = target // 2
                omega = _draw(key, like, p_old, count=p - p_old, kind="normal")
                alg = XTrace(p_old=p_old, p=p, chunk=chunk, n=n, jackknife=jackknife, keep=True)
                state = _xtrace_state(alg, omega, like, carry, total)
            if ckpt is not None:
                remove_checkpoint(inner.path)  # a finished round's file that outlived it
                empty = jnp.zeros((0,), acc_dtype(like))
                save_state(
                    ckpt.path,
                    {"key": key, "round": state, "pooled": empty if pooled is None else pooled},
                    fp,
                    round_machine=type(alg).__name__,
                    round_settings=dataclasses.asdict(alg),
                    total=total,
                    pooled=0 if pooled is None else int(pooled.shape[0]),
                )
        out = run(alg, op, state, driver=driver, progress=progress, checkpoint=inner, consume=True)[
            0
        ]
        last = alg
        if isinstance(alg, ExactTrace):
            est, se, samples, _ = out
            raise_if_nonfinite(op, "trace estimate", est)
            return finish(
                TraceResult(
                    estimate=est,
                    std_error=se,
                    num_matvecs=total + n,
                    method="exact",
                    samples=samples,
                    converged=True,
                    dtype_policy=policy,
                )
            )
        if isinstance(alg, Hutchinson):
            pooled = out[2] if pooled is None else jnp.concatenate([pooled, out[2]])
            samples = pooled
            est, se = _mean_se(samples)
            total += alg.count
        elif isinstance(alg, HutchPP):
            est, se, samples, _, carry = out
            total = 2 * alg.k + alg.r
        else:
            est, se, samples, _, carry = out
            total = 2 * alg.p
        res = TraceResult(
            estimate=est,
            std_error=se,
            num_matvecs=total,
            method=method,
            samples=samples,
            converged=False,
            dtype_policy=policy,
        )
        raise_if_nonfinite(op, "trace estimate", est)
        if total >= 2 and _met(est, se, rtol, atol):
            return finish(dataclasses.replace(res, converged=True))
    if res is not None:
        _warn_not_converged(op, res, rtol, atol, max_matvecs)
    return finish(res)


def _warn_not_converged(op, res, rtol, atol, max_matvecs) -> None:
    """The :class:`hvp.ConvergenceWarning` of an adaptive trace that missed its tolerance."""
    est, se = float(res.estimate), float(res.std_error)
    warn_not_converged(
        f"hvp.trace (method={res.method!r}, adaptive) on the {op.name} operator did not "
        f"converge: std_error {se:.3g} > max(rtol * |estimate|, atol) = "
        f"{max(rtol * abs(est), atol):.3g} (estimate {est:.6g}) after {res.num_matvecs} "
        f"products (max_matvecs={max_matvecs}). What can help: raise `max_matvecs` (up to n = "
        f"{op.size} gives the exact trace), loosen `rtol`/`atol`"
        + (
            ", or method='hutch++'/'xtrace' (their error falls as 1/m, Hutchinson's as 1/sqrt(m), "
            "on spectra with a few large eigenvalues)"
            if res.method == "hutchinson"
            else ""
        )
        + ". `result.converged` says it.",
        stacklevel=5,
    )
