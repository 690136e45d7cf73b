r"""Hessian-free optimization (Martens, 2010) as an optax gradient transformation.

Each step minimises the damped quadratic model of the batch loss :math:`L`
around the parameters :math:`\theta` with gradient :math:`g`,

.. math::

   q(p) = g^\top p + \tfrac12 p^\top B p, \qquad
   p = \arg\min_p \; q(p) + \tfrac{\lambda}{2} \|p\|^2
     = -(B + \lambda I)^{-1} g,

matrix-free: the curvature :math:`B` is the generalised Gauss-Newton matrix
:math:`J^\top H_\ell J` (:func:`hvp.ggn`, positive semi-definite, solved by
conjugate gradients) or the Hessian (:func:`hvp.hessian`, indefinite away
from a minimum, solved by MINRES), each product one pass over the curvature
batch; the solve (:func:`hvp.solve`) stops at a relative residual
``rtol`` or after ``max_matvecs`` products, whichever comes first. Of
Martens (2010) and Martens & Sutskever (2012, "Training deep and recurrent
networks with Hessian-free optimization") this implements:

* the damped GGN with CG (or the damped Hessian with MINRES); a solution that
  points uphill (:math:`g^\top p > 0`, as MINRES can return on an indefinite
  Hessian) is reversed, which lowers the model: :math:`q(-p) = q(p) - 2 g^\top p`;
* warm starts: the solve starts from the previous step's solution times
  ``warm_start`` (0.95, Martens, 2010, Section 4.5);
* a budget of curvature products per step (``max_matvecs``);
* Levenberg-Marquardt damping from the reduction ratio
  :math:`\rho = (L(\theta + p) - L(\theta)) / q(p)` (Martens, 2010,
  Section 4.1): :math:`\lambda \leftarrow \tfrac32 \lambda` when
  :math:`\rho < \tfrac14`, :math:`\lambda \leftarrow \tfrac23 \lambda` when
  :math:`\rho > \tfrac34`. :math:`q` is the *undamped* model (the damping
  is a trust-region device, not part of the model of :math:`L`), so
  :math:`\rho = 1` exactly on a quadratic loss whose curvature is :math:`B`;
* the backtracking line search of Martens' published code (also in Martens &
  Sutskever, 2012): step sizes :math:`\alpha = 1, 0.8, 0.8^2, \dots` until
  the Armijo condition :math:`L(\theta + \alpha p) \le L(\theta) + 10^{-2}
  \alpha\, g^\top p` holds, at most ``max_backtracks`` reductions, else the
  step is rejected (:math:`\alpha = 0`).

Not implemented: CG-backtracking (evaluating the loss at earlier CG iterates
and keeping the best one, Martens 2010 Section 4.6; the solver returns only
its final iterate), Martens' stopping rule on the relative progress of
:math:`q` (the solve stops on its residual instead), the structural damping
of recurrent networks (Martens & Sutskever, 2011) and preconditioning of CG
by the diagonal of the empirical Fisher (Martens 2010, Section 4.7).

Every piece is a JAX computation on arrays: the damping, the warm start and
the diagnostics live in the optimizer state, the solve runs compiled
(``lax.while_loop``) and the line search is a ``lax.while_loop``, so the
whole step can run inside the user's ``jax.jit`` and is compiled once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from hvp import linalg as _linalg
from hvp import operators as _ops
from hvp import tree as tu
from hvp.linalg._checks import acc_dtype, check_finite_float, check_int

__all__ = ["hessian_free", "HessianFreeState"]

#: Curvatures of :func:`hessian_free` and the solver each uses.
CURVATURES = {"ggn": "cg", "hessian": "minres"}

#: Armijo constant and step-size factor of the line search (Martens' code).
_ARMIJO = 1e-2
#: the least default relative tolerance of the solve (float64 parameters).
_HF_RTOL = 1e-4
_BACKTRACK = 0.8


class HessianFreeState(NamedTuple):
    """State of :func:`hessian_free`: the damping, the warm start and the last step's diagnostics.

    Attributes:
      count: steps taken (int32).
      damping: the current Levenberg-Marquardt damping :math:`\\lambda` (a scalar
        array in the accumulation dtype: at least float32), used by the next step.
      prev_step: the previous step's solution :math:`p` (before the line
        search), a pytree like the parameters; the next solve starts from
        ``warm_start * prev_step``.
      loss: the batch loss at the parameters the last step was taken from.
      new_loss: the batch loss after the last step (``loss`` when it was rejected).
      rho: the last reduction ratio :math:`(L(\\theta + p) - L(\\theta)) / q(p)`
        (NaN before the first step and when the gradient was zero;
        ``-inf`` when the model predicted no decrease, :math:`q(p) \\ge 0`).
      step_size: the line search's :math:`\\alpha` (1 without line search, 0 for a
        rejected step).
      num_matvecs: curvature products of the last step (the solve's, plus one
        for :math:`p^\\top B p`).
      converged: whether the last solve met ``rtol`` (on its true residual).

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> opt = hvp.optim.hessian_free(lambda p, x: x @ p, hvp.losses.mean_squared_error)
      >>> state = opt.init(jnp.zeros(2))
      >>> int(state.count), float(state.damping), state.prev_step.tolist()
      (0, 1.0, [0.0, 0.0])
    """

    count: jax.Array  # type: ignore[assignment]  # optax states name their step counter `count`
    damping: jax.Array
    prev_step: Any
    loss: jax.Array
    new_loss: jax.Array
    rho: jax.Array
    step_size: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array


def _missing(name: str) -> TypeError:
    return TypeError(
        f"hessian_free's update needs `{name}=`: call it as "
        "`updates, state = opt.update(grads, state, params, batch=batch)`, where `grads` is the "
        "gradient of the batch loss at `params` and `batch` the (inputs, targets) the loss and "
        "the curvature are evaluated on."
    )


def hessian_free(
    model_fn: Callable,
    loss_fn: Callable,
    *,
    curvature: str = "ggn",
    damping: float = 1.0,
    max_matvecs: int = 50,
    rtol: float | None = None,
    warm_start: float = 0.95,
    adapt_damping: bool = True,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    line_search: bool = True,
    max_backtracks: int = 20,
    unpack: Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Hessian-free optimization (Martens, 2010) as an optax ``GradientTransformationExtraArgs``.

    The batch loss is ``L(params) = loss_fn(model_fn(params, inputs), targets)``
    (as :func:`hvp.ggn`; ``(inputs, targets) = unpack(batch)``, default the
    conventions of :func:`hvp.operators.default_unpack`, weighted batches
    included). Each ``update`` solves :math:`(B + \lambda I) p = -g` for the
    curvature :math:`B` at ``params`` (the GGN with CG, or the Hessian with
    MINRES), warm-started from ``warm_start`` times the previous solution and
    with at most ``max_matvecs`` products (the solve returns its best verified iterate, never
    one whose residual exceeds that of ``p = 0`` or of the warm start: see
    :func:`hvp.solve`; a truncated solve emits no warning here, ``state.converged`` says it),
    takes a backtracking line search
    along :math:`p` and adapts :math:`\lambda` from the reduction ratio; see
    :mod:`hvp.optim._hessian_free` for the rules and which of Martens' pieces
    are implemented.

    Use it in an optax loop, passing the batch as an extra argument::

        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params, batch=batch)
        params = optax.apply_updates(params, updates)

    ``update(updates, state, params, *, batch, curvature_batch=None, value=None)``:

    * ``updates``: the gradient :math:`g` of the batch loss at ``params`` (a
      pytree like ``params``);
    * ``params``: required (the curvature is taken there);
    * ``batch``: required; the loss for the reduction ratio and the line search
      is evaluated on it;
    * ``curvature_batch``: optional batch for the curvature products (Martens
      uses a smaller one than the gradient's); default ``batch``;
    * ``value``: optional ``L(params)`` on ``batch`` when the caller has it
      (``jax.value_and_grad``), saving one forward pass;
    * other extra arguments (from ``optax.chain``) are ignored.

    The step is a JAX computation throughout (the damping is a traced scalar
    in the state, the solve runs its compiled driver): put the whole step
    inside ``jax.jit``; it compiles once.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``.
      loss_fn: ``loss_fn(outputs, targets[, weights]) -> scalar``, e.g.
        :data:`hvp.losses.softmax_cross_entropy` (convex in the outputs for the
        GGN to be positive semi-definite).
      curvature: ``"ggn"`` (default; conjugate gradients) or ``"hessian"``
        (MINRES, for indefinite curvature).
      damping: initial :math:`\lambda > 0`. The adaptation moves it by
        factors of 3/2 and 2/3 per step, so a poor start costs a few steps; the
        top eigenvalue of the GGN (``hvp.eigsh``) is a safe upper end.
      max_matvecs: budget of curvature products of one solve (>= 2; as in
        :func:`hvp.solve`, the product of the warm start and the final
        true-residual product count); a step uses one more, for :math:`p^\top B p`.
      rtol: the solve stops when its relative residual
        :math:`\|b - (B + \lambda I)x\| / \|b\|` falls below ``rtol``. ``None``:
        ``max(1e-4, hvp.linalg.default_rtol(params))`` (an inexact Newton step; Martens' own
        rule is looser still): ``1e-4`` for float64, ``3.45e-4`` for float32, ``0.031`` for
        float16 and ``0.088`` for bfloat16 parameters, within reach of the dtype's round-off
        (a fixed ``1e-4`` never converges in half precision).
      warm_start: factor in ``[0, 1]`` on the previous solution the solve
        starts from (0 starts from zero).
      adapt_damping: adapt :math:`\lambda` from the reduction ratio (else it
        stays at ``damping``).
      min_damping: lower bound the adapted damping is clipped to (``>= 0``,
        ``<= damping``).
      max_damping: upper bound the adapted damping is clipped to (``>= damping``).
      line_search: backtrack along :math:`p` (Armijo, factor 0.8); without it
        the full solution :math:`p` is taken unless the loss there is NaN/Inf.
      max_backtracks: most step-size reductions of the line search (>= 0).
      unpack: ``batch -> (inputs, targets[, weights])``, as in :func:`hvp.ggn`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`HessianFreeState` (damping, reduction ratio, step size, products
      and the solve's convergence of the last step, for logging).

    Raises:
      ValueError: an unknown ``curvature``; ``damping`` not > 0 or outside
        ``[min_damping, max_damping]``; ``warm_start`` outside ``[0, 1]``;
        non-finite or negative settings; ``max_matvecs < 2``.
      TypeError: ``model_fn``/``loss_fn`` not callable; at ``update``: no
        ``params`` or no ``batch`` (the message shows the call), or ``updates``
        not shaped like ``params``.

    A step that produces NaN/Inf (a diverging solve, a non-finite loss after
    the step) is rejected (update 0), the damping raised and the warm start
    reset, so training continues with a more conservative step. (Called
    outside ``jax.jit``, a solve whose products are NaN/Inf raises
    :class:`~hvp.operators.NonFiniteError` instead, as every algorithm does on
    concrete values.)

    Examples:
      >>> import jax, jax.numpy as jnp, optax, hvp
      >>> model = lambda p, x: x @ p  # linear least squares: one Newton step solves it
      >>> x, y = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]), jnp.array([[1.0], [2.0], [3.0]])
      >>> loss = hvp.operators.compose(model, hvp.losses.mean_squared_error)
      >>> opt = hvp.optim.hessian_free(model, hvp.losses.mean_squared_error, damping=1e-6)
      >>> @jax.jit
      ... def step(params, state, batch):
      ...     grads = jax.grad(loss)(params, batch)
      ...     updates, state = opt.update(grads, state, params, batch=batch)
      ...     return optax.apply_updates(params, updates), state
      >>> params, state = step(jnp.zeros((2, 1)), opt.init(jnp.zeros((2, 1))), (x, y))
      >>> params.ravel().round(4).tolist(), float(state.rho), float(state.step_size)
      ([1.0, 1.0], 1.0, 1.0)
    """
    if not callable(model_fn) or not callable(loss_fn):
        raise TypeError(
            "hessian_free needs `model_fn(params, inputs) -> outputs` and "
            "`loss_fn(outputs, targets) -> scalar` callables (e.g. hvp.losses.softmax_cross_entropy)."
        )
    if unpack is not None and not callable(unpack):
        raise TypeError(f"`unpack` must be a callable batch -> (inputs, targets), got {unpack!r}.")
    if curvature not in CURVATURES:
        raise ValueError(
            f"`curvature` must be one of {tuple(CURVATURES)} (the GGN solved by CG, or the "
            f"Hessian solved by MINRES), got {curvature!r}."
        )
    damping = check_finite_float("damping", damping, positive=True)
    min_damping = check_finite_float("min_damping", min_damping)
    max_damping = check_finite_float("max_damping", max_damping, positive=True)
    if not min_damping <= damping <= max_damping:
        raise ValueError(
            f"Need min_damping <= damping <= max_damping, got {min_damping} <= {damping} <= "
            f"{max_damping}: widen the bounds or change the initial `damping`."
        )
    max_matvecs = check_int(
        "max_matvecs",
        max_matvecs,
        minimum=2,
        hint="It counts the solve's products, the product of the warm start and the final "
        "true-residual product included.",
    )
    if rtol is not None:
        rtol = check_finite_float("rtol", rtol)
    warm_start = check_finite_float("warm_start", warm_start)
    if warm_start > 1:
        raise ValueError(
            f"`warm_start` must lie in [0, 1] (Martens uses 0.95; 0 starts every solve from "
            f"zero), got {warm_start}."
        )
    max_backtracks = check_int("max_backtracks", max_backtracks, minimum=0)
    method = CURVATURES[curvature]
    batch_loss = _ops.compose(model_fn, loss_fn, unpack)

    def operator(params, data):
        if curvature == "ggn":
            return _ops.ggn(model_fn, loss_fn, params, data, unpack=unpack, check_finite=False)
        return _ops.hessian(batch_loss, params, data, check_finite=False)

    def init_fn(params):
        tu.assert_floating(params)
        acc = acc_dtype(params)
        nan = jnp.full((), jnp.nan, acc)
        return HessianFreeState(
            count=jnp.zeros((), jnp.int32),
            damping=jnp.asarray(damping, acc),
            prev_step=tu.zeros_like(params),
            loss=nan,
            new_loss=nan,
            rho=nan,
            step_size=jnp.zeros((), acc),
            num_matvecs=jnp.zeros((), jnp.int32),
            converged=jnp.array(False),
        )

    def update_fn(
        updates, state, params=None, *, batch=None, curvature_batch=None, value=None, **extra
    ):
        del extra  # extra arguments of other transformations in an optax.chain
        if params is None:
            raise _missing("params")
        if batch is None:
            raise _missing("batch")
        tu.assert_same_structure(updates, params, name="updates", like_name="params")
        acc = state.damping.dtype
        grad = updates
        lam = state.damping
        loss0 = batch_loss(params, batch) if value is None else value
        loss0 = jnp.asarray(loss0).astype(acc)
        op = operator(params, batch if curvature_batch is None else curvature_batch)

        x0 = tu.scale(warm_start, state.prev_step)
        tol = max(_HF_RTOL, _linalg.default_rtol(params)) if rtol is None else rtol
        # the damping enters as an operator term (a traced scalar among the operator's arrays),
        # not as the solver's static `damping=`: the step compiles once however it moves
        with warnings.catch_warnings():  # an unconverged solve: `state.converged` is False
            warnings.simplefilter("ignore", _linalg.ConvergenceWarning)
            sol = _linalg.solve(
                op + lam,
                tu.scale(-1.0, grad),
                method=method,
                x0=x0,
                rtol=tol,
                max_matvecs=max_matvecs,
                driver="compiled",
            )
        finite = tu.all_finite(sol.x)
        # An ascent direction (g^T p > 0: MINRES on an indefinite Hessian, or a truncated
        # warm-started solve) is reversed: q(-p) = q(p) - 2 g^T p < q(p), and -p descends.
        sign = jnp.where(tu.dot(grad, sol.x) > 0, -1.0, 1.0)
        p = tu.map(lambda a: jnp.where(finite, sign.astype(a.dtype) * a, jnp.zeros_like(a)), sol.x)
        gp = tu.dot(grad, p).astype(acc)
        pbp = tu.dot(p, op @ p).astype(acc)
        q = gp + 0.5 * pbp  # undamped quadratic model
        loss1 = jnp.asarray(batch_loss(tu.add(params, p), batch)).astype(acc)
        no_step = gp == 0
        rho = jnp.where(no_step, jnp.nan, jnp.where(q < 0, (loss1 - loss0) / q, -jnp.inf))
        rho = jnp.where(finite | no_step, rho, -jnp.inf)

        if line_search:
            alpha, new_loss = _backtrack(
                batch_loss, params, p, batch, loss0, loss1, gp, max_backtracks
            )
        else:
            ok = finite & jnp.isfinite(loss1)
            alpha = jnp.where(ok, 1.0, 0.0).astype(acc)
            new_loss = jnp.where(ok, loss1, loss0)

        if adapt_damping:
            factor = jnp.where(rho > 0.75, 2.0 / 3.0, jnp.where(rho >= 0.25, 1.0, 1.5))
            factor = jnp.where(no_step, 1.0, factor).astype(acc)
            lam = jnp.clip(lam * factor, min_damping, max_damping)
        new_state = HessianFreeState(
            count=state.count + 1,
            damping=lam,
            prev_step=p,
            loss=loss0,
            new_loss=new_loss,
            rho=rho,
            step_size=alpha,
            num_matvecs=jnp.asarray(sol.num_matvecs, jnp.int32) + 1,
            converged=jnp.asarray(sol.converged) & finite,
        )
        return tu.scale(alpha, p), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _backtrack(batch_loss, params, p, batch, loss0, loss1, gp, max_backtracks):
    """``(alpha, L(params + alpha p))``: Armijo backtracking from ``alpha = 1`` (0 when it fails)."""
    acc = loss0.dtype

    def accepted(alpha, loss):
        return (gp < 0) & jnp.isfinite(loss) & (loss <= loss0 + _ARMIJO * alpha * gp)

    def cond(carry):
        alpha, loss, k = carry
        return (gp < 0) & ~accepted(alpha, loss) & (k < max_backtracks)

    def body(carry):
        alpha, _, k = carry
        alpha = alpha * _BACKTRACK
        loss = jnp.asarray(batch_loss(tu.axpy(alpha, p, params), batch)).astype(acc)
        return alpha, loss, k + 1

    alpha, loss, _ = lax.while_loop(
        cond, body, (jnp.ones((), acc), loss1, jnp.zeros((), jnp.int32))
    )
    ok = accepted(alpha, loss)
    return jnp.where(ok, alpha, 0.0).astype(acc), jnp.where(ok, loss, loss0)
