r"""What kind of point the parameters are at: the second-derivative test, matrix-free.

For a twice differentiable loss :math:`L` a point :math:`\theta` is a *critical point* when
:math:`\nabla L(\theta) = 0`; the second-derivative test (e.g. Nocedal & Wright, *Numerical
Optimization*, 2nd ed., Theorems 2.3-2.4) classifies it from the Hessian
:math:`H = \nabla^2 L(\theta)`:

* :math:`\lambda_{\min}(H) > 0`: strict **local minimum**;
* :math:`\lambda_{\max}(H) < 0`: strict **local maximum**;
* :math:`\lambda_{\min}(H) < 0 < \lambda_{\max}(H)`: **saddle point**;
* otherwise (an extreme eigenvalue is 0: flat directions) the test is **inconclusive**:
  higher derivatives decide (:math:`x^4` and :math:`x^3` both have :math:`H = 0` at 0).

Numerically "= 0" needs tolerances, and they are part of the answer
(:class:`CriticalPointResult` states them): the gradient norm is compared with ``grad_tol``;
an eigenvalue counts as zero when :math:`|\lambda| \le \epsilon`, with
:math:`\epsilon = \max(\mathrm{zero\_tol}\cdot\max|\lambda|,\ r_{\min},\ r_{\max})`, so that an
eigenvalue whose sign its residual bound cannot decide is never called positive or negative
(for a symmetric :math:`H` and a unit Ritz vector :math:`v`, some eigenvalue lies within
:math:`r = \lVert Hv - \theta v\rVert` of the Ritz value :math:`\theta`; Parlett, *The
Symmetric Eigenvalue Problem*, Thm 4.5.1). The extreme eigenvalues come from
:func:`hvp.linalg.eigsh` (both ends, with its residuals and confirmation); the optional
negative mass (Sagun et al. 2017; Ghorbani, Krishnan & Xiao 2019) from
:func:`hvp.linalg.spectral_density`.
"""

from __future__ import annotations

import jax
import numpy as np

from hvp import tree as tu
from hvp.linalg import eigsh, spectral_density, zero_floor
from hvp.linalg._checks import check_finite_float, check_int, check_key
from hvp.operators import CurvatureOperator, as_operator, data_gradient
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["CriticalPointResult", "classify_critical_point", "VERDICTS", "critical_verdict"]

#: The ``kind`` of :class:`CriticalPointResult`, with the start of its ``verdict``.
VERDICTS = {
    "minimum": "local minimum",
    "maximum": "local maximum",
    "saddle": "saddle point",
    "degenerate": "degenerate (flat directions): test inconclusive",
    "not critical": "not a critical point: gradient norm",
}


@tu.result(static=("verdict", "kind"))
class CriticalPointResult:
    r"""Result of :func:`classify_critical_point`: the verdict, the figures and the tolerances.

    Attributes:
      verdict: ``"local minimum"``, ``"saddle point"``, ``"local maximum"``, ``"degenerate
        (flat directions): test inconclusive"`` or ``"not a critical point: gradient norm X"``.
      kind: ``"minimum"``, ``"saddle"``, ``"maximum"``, ``"degenerate"`` or ``"not critical"``.
      gradient_norm: :math:`\lVert\nabla L\rVert_2` over the data set (float).
      grad_tol: the point is critical when ``gradient_norm <= grad_tol``.
      lambda_min, lambda_max: extreme eigenvalues of the Hessian (Ritz values, floats).
      lambda_min_error, lambda_max_error: their residual bounds :math:`\lVert Hv-\lambda v\rVert`
        (an eigenvalue of :math:`H` lies within this distance of each).
      zero_threshold: :math:`\epsilon`: eigenvalues with :math:`|\lambda| \le \epsilon` count as 0.
      zero_tol: the relative part of :math:`\epsilon` (times :math:`\max|\lambda|`).
      converged: both extreme pairs met eigsh's tolerance and were confirmed.
      negative_mass: estimated fraction of eigenvalues below :math:`-\epsilon` (SLQ), or
        ``None`` when not requested.
      negative_weight: :math:`\sum_{\lambda<-\epsilon}|\lambda| / \sum|\lambda|` (SLQ), or ``None``.
      num_matvecs: Hessian products used (the gradient is not counted: one gradient per batch).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> H = hvp.hessian(lambda p, b: p[0] ** 2 - p[1] ** 2, jnp.zeros(2), jnp.zeros((1, 1)))
      >>> hvp.classify_critical_point(H, key=jax.random.key(0)).verdict
      'saddle point'
    """

    verdict: str
    kind: str
    gradient_norm: float
    grad_tol: float
    lambda_min: float
    lambda_max: float
    lambda_min_error: float
    lambda_max_error: float
    zero_threshold: float
    zero_tol: float
    converged: bool
    negative_mass: float | None = None
    negative_weight: float | None = None
    num_matvecs: int = 0

    @property
    def is_critical(self) -> bool:
        """``gradient_norm <= grad_tol``."""
        return self.kind != "not critical"


def critical_verdict(
    gradient_norm: float, lambda_min: float, lambda_max: float, *, grad_tol: float, zero: float
) -> tuple[str, str]:
    r"""``(kind, verdict)`` of the second-derivative test with explicit tolerances.

    Not critical when ``gradient_norm > grad_tol``; otherwise, with eigenvalues of magnitude at
    most ``zero`` counted as 0: minimum (:math:`\lambda_{\min} > \epsilon`), maximum
    (:math:`\lambda_{\max} < -\epsilon`), saddle (:math:`\lambda_{\min} < -\epsilon` and
    :math:`\lambda_{\max} > \epsilon`), else degenerate (inconclusive).

    Examples:
      >>> from hvp.critical import critical_verdict
      >>> critical_verdict(0.0, -1.0, 2.0, grad_tol=1e-6, zero=1e-6)
      ('saddle', 'saddle point')
      >>> critical_verdict(0.5, 1.0, 2.0, grad_tol=1e-6, zero=1e-6)
      ('not critical', 'not a critical point: gradient norm 0.5')
    """
    g, lo, hi, z = float(gradient_norm), float(lambda_min), float(lambda_max), float(zero)
    if not g <= grad_tol:  # NaN is not critical either
        return "not critical", f"{VERDICTS['not critical']} {g:.3g}"
    if lo > z:
        kind = "minimum"
    elif hi < -z:
        kind = "maximum"
    elif lo < -z and hi > z:
        kind = "saddle"
    else:
        kind = "degenerate"
    return kind, VERDICTS[kind]


def classify_critical_point(
    op: OperatorLike,
    *,
    key: PRNGKey,
    gradient: PyTree | None = None,
    grad_tol: float = 1e-6,
    zero_tol: float | None = None,
    tol: float = 1e-6,
    density: bool = False,
    num_probes: int = 8,
    num_iters: int = 40,
    like: PyTree | None = None,
    driver: str = "auto",
    progress: bool | None = None,
) -> CriticalPointResult:
    r"""Classify the point a Hessian is taken at: minimum, maximum, saddle, degenerate, or not critical.

    Computes the gradient norm over the operator's data set (:func:`hvp.operators.data_gradient`:
    the exact batch weights of the Hessian's own products), the extreme eigenvalues
    :math:`\lambda_{\min}, \lambda_{\max}` with their residual bounds
    (:func:`hvp.linalg.eigsh`, ``which="both"``, ``k=1``), optionally the negative mass of
    the spectrum (:func:`hvp.linalg.spectral_density`), and applies the second-derivative test
    with the tolerances stated in the result (see the module docstring).

    Args:
      op: the Hessian, :func:`hvp.hessian` (a GGN or Fisher is positive semi-definite by
        construction and cannot tell a saddle from a minimum: refused), or any symmetric
        operator together with ``gradient=``.
      key: PRNG key (required) for Lanczos and SLQ.
      gradient: the gradient at the point (a pytree like the parameters); default: computed
        from ``op``'s loss and data (required when ``op`` is not a curvature operator).
      grad_tol: the point is critical when :math:`\lVert\nabla L\rVert_2 \le` ``grad_tol``
        (absolute; the loss's scale sets what is small).
      zero_tol: eigenvalues with :math:`|\lambda| \le \max(\mathrm{zero\_tol}\max|\lambda|,
        r_{\min}, r_{\max})` count as 0 (default: ``tol`` floored at eigsh's accuracy near
        zero, :func:`hvp.linalg.zero_floor` of the products' dtype).
      tol: eigsh's relative tolerance.
      density: also estimate the negative mass by SLQ (``num_probes * num_iters`` more products).
      num_probes: SLQ probes (with ``density=True``).
      num_iters: SLQ Lanczos steps per probe (with ``density=True``).
      like: the parameter pytree when ``op`` is a matvec callable.
      driver: ``"auto"``, ``"compiled"`` or ``"host"``, as in :func:`hvp.linalg.eigsh`.
      progress: show the products done (host driver), as in :func:`hvp.linalg.eigsh`.

    Returns:
      A :class:`CriticalPointResult` (Python floats and ints, JSON-serialisable).

    Raises:
      TypeError: bad ``key``; ``op`` is not a curvature operator and no ``gradient`` is given.
      ValueError: ``op`` is a GGN or empirical Fisher; a negative or non-finite tolerance;
        ``gradient`` not shaped like the parameters.
      NonFiniteError: NaN or Inf in the gradient or the eigenpairs.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> rosen = lambda p, b: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
      >>> H = hvp.hessian(rosen, jnp.ones(2), jnp.zeros((1, 1)))  # the data set is unused
      >>> r = hvp.classify_critical_point(H, key=jax.random.key(0))
      >>> r.verdict, r.gradient_norm, round(r.lambda_min, 4), round(r.lambda_max, 2)
      ('local minimum', 0.0, 0.3994, 1001.6)
    """
    check_key(key)
    grad_tol = check_finite_float("grad_tol", grad_tol)
    tol = check_finite_float("tol", tol)
    if isinstance(op, CurvatureOperator) and op.kind != "hessian":
        raise ValueError(
            f"`op` is a {op.kind} operator, which is positive semi-definite by construction and "
            "cannot tell a saddle point from a minimum; pass the Hessian (hvp.hessian or "
            "problem.hessian(data))."
        )
    op = as_operator(op, like)
    if gradient is None:
        if not isinstance(op, CurvatureOperator):
            raise TypeError(
                "Pass `gradient=` (a pytree like the parameters): a dense or matvec operator "
                "has no loss to differentiate; hvp.hessian(...) operators compute it themselves."
            )
        gradient = data_gradient(op)
    else:
        tu.assert_same_structure(gradient, op.like, name="gradient", check_dtype=False)
    gnorm = float(tu.norm(gradient))
    dtype = jax.tree_util.tree_leaves(op.like)[0].dtype
    if zero_tol is None:
        zero_tol = max(tol, zero_floor(dtype, tol))
    zero_tol = check_finite_float("zero_tol", zero_tol)

    n = op.size
    if n >= 2:
        res = eigsh(op, 1, which="both", key=key, tol=tol, driver=driver, progress=progress)
        lam = np.asarray(res.eigenvalues, np.float64)
        resid = np.asarray(res.residuals, np.float64)
        lo, hi, r_lo, r_hi = lam[0], lam[-1], resid[0], resid[-1]
    else:  # one parameter: the one eigenvalue is both ends
        res = eigsh(op, 1, which="largest", key=key, tol=tol, driver=driver, progress=progress)
        lo = hi = float(np.asarray(res.eigenvalues)[0])
        r_lo = r_hi = float(np.asarray(res.residuals)[0])
    matvecs = int(res.num_matvecs)
    zero = max(zero_tol * max(abs(lo), abs(hi)), r_lo, r_hi)
    neg_mass = neg_weight = None
    if density:
        sd = spectral_density(
            op,
            key=jax.random.fold_in(key, 1),
            num_probes=check_int("num_probes", num_probes, minimum=1),
            num_iters=check_int("num_iters", num_iters, minimum=1),
            driver=driver,
            progress=progress,
        )
        matvecs += int(sd.num_matvecs)
        neg_mass = float(sd.negative_mass(zero))
        nodes = np.asarray(sd.nodes, np.float64).ravel()
        weights = np.asarray(sd.weights, np.float64).ravel()
        total = float(np.sum(weights * np.abs(nodes)))
        neg = float(np.sum((weights * np.abs(nodes))[nodes < -zero]))
        neg_weight = neg / total if total > 0 else 0.0
    kind, verdict = critical_verdict(gnorm, lo, hi, grad_tol=grad_tol, zero=zero)
    return CriticalPointResult(
        verdict=verdict,
        kind=kind,
        gradient_norm=gnorm,
        grad_tol=float(grad_tol),
        lambda_min=float(lo),
        lambda_max=float(hi),
        lambda_min_error=float(r_lo),
        lambda_max_error=float(r_hi),
        zero_threshold=float(zero),
        zero_tol=float(zero_tol),
        converged=bool(np.all(np.asarray(res.converged))),
        negative_mass=neg_mass,
        negative_weight=neg_weight,
        num_matvecs=matvecs,
    )
