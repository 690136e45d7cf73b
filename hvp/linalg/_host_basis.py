r"""``eigsh(basis="host")``: thick-restart Lanczos with its Krylov basis in host memory.

The full-basis :func:`hvp.eigsh` keeps ``(num_iters + 1) * n`` numbers of basis next to the
model on the accelerator, which is what caps the model size (a 1e9-parameter model with the
default 31-row float32 basis needs 124 GB). With ``basis="host"`` the basis lives in the host's
RAM, as JAX arrays on the host's CPU device (``jax.local_devices(backend="cpu")[0]``), and the
accelerator holds only the vectors a step needs. It is the same algorithm as
``basis="device"`` (:class:`~hvp.linalg._lanczos.ThickRestartLanczos`: the same Lanczos step,
Ritz extraction, locking, confirmation, thick and explicit restarts and convergence tests, same
:class:`~hvp.linalg.EigshResult`): :class:`HostBasisLanczos` only changes where the basis is
stored and where the few functions that touch it run.

* Every access to the basis is one of the shared functions of :mod:`hvp.linalg._lanczos`
  (``_extend_basis``: the Lanczos step with full reorthogonalisation and breakdown,
  ``_unit_ritz``, ``_locked_basis``, ``_restarted_basis``, ``_reset_basis``). The device mode
  calls them inside its compiled steps; the host mode compiles the same functions for the CPU
  device and calls them on the host basis.
* The rest of a step (projected matrix, Ritz pairs, residual bounds, locking and restart
  decisions, the true-residual check) runs on the accelerator as in the device mode, on the
  state without the basis. A decision that rewrites the basis (a lock, a thick restart, an
  explicit restart) is recorded in the state as a *plan* (its kind, the small ``m x m``
  coefficient matrix, the fresh vector's key) and applied to the host basis right after.
* The steps run from Python (:attr:`StateMachine.host_steps`), so only the host driver runs
  them: ``driver="compiled"`` or a call inside ``jax.jit``/``jax.vmap`` raises (use
  ``basis="device"`` or ``basis="none"`` there). Progress and checkpoints work as for every
  host-driver algorithm; a checkpoint saves the host basis with the rest of the state (same
  ``.npz`` format) and resumes bit for bit.

Cost per Lanczos step, besides the product: the product ``A v_j`` goes to the host and the next
basis vector comes back to the device (``2 n`` numbers in the parameters' dtype over the
host-device link: 8 GB per step for 1e9 float32 parameters, about 0.3 s at 25 GB/s PCIe), plus
a few scalars and the ``m + 1`` Gram-Schmidt coefficients. On the host, full reorthogonalisation
reads the ``j + 1`` rows in use two or three times (classical Gram-Schmidt twice, a third pass
only when the second still cancels): ``4-6 (j + 1) n`` flops, memory-bound (about
``2-3 (j + 1) n`` numbers read per step). A residual check sends the ``k`` wanted Ritz vectors
to the device (``k n`` numbers; ``2 m k n`` host flops to form them); a thick restart or a lock
runs on the host (``2 m p n`` flops) and moves nothing but the ``m x m`` coefficients.

Memory: the host holds the ``(m + 1) n`` numbers of the basis (in ``basis_dtype``) plus up to
``p + 2`` vectors during a restart; the device holds the state's ``k`` Ritz vectors, two
vectors during a Lanczos step (``v_j`` and ``A v_j``, plus the product's own temporaries) and
about ``3k`` during a residual check (the Ritz vectors, their products and residuals), instead of
``m + 1 + 3k`` for ``basis="device"``. With several devices (a mesh), each vector is gathered
into this process's host memory; several processes (multi-host) are not supported.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.linalg._checks import acc_dtype
from hvp.linalg._driver import _STEP_OPTIONS
from hvp.linalg._lanczos import (
    ThickRestartLanczos,
    _extend_basis,
    _locked_basis,
    _reset_basis,
    _restarted_basis,
    _unit_ritz,
    _unit_sum,
)

__all__ = ["HostBasisLanczos", "check_host_basis", "host_device", "host_initial_state"]

#: what a decision asked to do to the basis (state entry ``plan``); -1: two rewrites in one
#: decision (never happens: locking, thick and explicit restarts exclude one another)
_NONE, _LOCK, _RESTART, _RESET = 0, 1, 2, 3
_PLANS = {"lock": _LOCK, "restart": _RESTART, "reset": _RESET}


def host_device() -> jax.Device:
    """The host's CPU device, where ``basis="host"`` keeps the Krylov basis.

    Raises:
      ValueError: JAX's CPU backend is not available (``JAX_PLATFORMS`` excludes it).
    """
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError as err:
        raise ValueError(
            "eigsh(basis='host') keeps the Lanczos basis on JAX's CPU device, which is not "
            f"available ({err}). Include the CPU platform, e.g. JAX_PLATFORMS=cuda,cpu, or use "
            "basis='device' or basis='none'."
        ) from err


def check_host_basis(op, key, v0, driver: str) -> None:
    """Raise early when ``basis="host"`` cannot run: compiled driver, a trace, several processes."""
    if driver == "compiled" or tu.is_traced(op, key, v0):
        where = "with driver='compiled'" if driver == "compiled" else "inside jax.jit/jax.vmap"
        raise ValueError(
            f"eigsh(basis='host') cannot run {where}: it keeps the Lanczos basis in host memory "
            "and runs its steps from Python (the host driver). Use basis='device' (the full "
            "basis on the device) or basis='none' (the memory-lean mode) there, or call it "
            "outside the transformation with driver='host' (or 'auto')."
        )
    if jax.process_count() > 1:
        raise ValueError(
            "eigsh(basis='host') keeps the basis in one process's host memory; with several "
            f"processes ({jax.process_count()}) use basis='device' or basis='none'."
        )
    host_device()


# ------------------------------------------------------------------------------------------------
# transfers
# ------------------------------------------------------------------------------------------------
def _to_host(tree):
    """``tree`` copied to the host's CPU device (each sharded leaf gathered)."""
    dev = host_device()
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, dev), tree)


def _place(x, ref, leading: int):
    """The host array ``x`` (``leading`` extra axes) on the device(s) of the parameter ``ref``."""
    sharding = getattr(ref, "sharding", None)
    if isinstance(ref, jax.Array) and getattr(ref, "committed", False) and sharding is not None:
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec = jax.sharding.PartitionSpec(*((None,) * leading), *sharding.spec)
            return jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, spec))
        if len(sharding.device_set) == 1:
            return jax.device_put(x, sharding)
    return jnp.asarray(np.asarray(x))  # uncommitted, on the default device


def _to_device(block, like, leading: int = 1):
    """A host block (``leading`` extra axes) placed like the parameters ``like``."""
    out = jax.tree_util.tree_map(lambda x, ref: _place(x, ref, leading), block, like)
    return tu.stacked_like(out, like, leading) if leading else tu.like_sharding(out, like)


def _small(tree):
    """Small host results (scalars, coefficients) as NumPy arrays: placed by the next call."""
    return jax.tree_util.tree_map(np.asarray, tree)


# ------------------------------------------------------------------------------------------------
# the basis functions of the device mode, compiled for the host (the basis is donated: updated
# in place)
# ------------------------------------------------------------------------------------------------
def _host_like(V, acc):
    """Vectors like one basis row in the accumulation dtype (shapes only: never materialised)."""
    return jax.tree_util.tree_map(lambda Vl: jnp.zeros(Vl.shape[1:], acc), V)


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=(1, 2, 3))
def _host_empty(v0, rows: int, store: str, acc: str):
    V = jax.tree_util.tree_map(lambda x: jnp.zeros((rows,) + x.shape, store), v0)
    return jax.tree_util.tree_map(lambda Vl, x: Vl.at[0].set(x.astype(acc).astype(store)), V, v0)


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=2)
def _host_row(V, j, dtypes: tuple):
    """Row ``j`` (with a leading axis of 1) in the parameters' dtypes, ready for the product."""
    leaves, treedef = jax.tree_util.tree_flatten(V)
    rows = [Vl[j][None].astype(d) for Vl, d in zip(leaves, dtypes, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, rows)


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=0, donate_argnums=1)
def _host_extend(alg, V, at, w):
    """The Lanczos step on the host basis: ``at`` holds the step's scalars and key."""
    acc = jnp.result_type(at["anorm"])
    w = tu.cast(w, acc)
    V, ext = _extend_basis(
        V, at["j"], w, at["anorm"], alg.step_key(at), _host_like(V, acc), eps_break=alg.break_level
    )
    return V, (*ext, tu.all_finite(w))


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=2)
def _host_unit_ritz(V, cols, acc: str):
    return _unit_ritz(V, cols, _host_like(V, acc))


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=(3, 4), donate_argnums=0)
def _host_locked(V, cols, key, k_total: int, acc: str):
    return _locked_basis(V, cols, key, k_total, _host_like(V, acc))


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=2, donate_argnums=0)
def _host_restarted(V, cols, acc: str):
    return _restarted_basis(V, cols, _host_like(V, acc))


@partial(jax.jit, compiler_options=_STEP_OPTIONS, donate_argnums=0)
def _host_reset(V, v):
    return _reset_basis(V, v)


# ------------------------------------------------------------------------------------------------
# the device part of the steps: the shared state machine on the state without the basis
# ------------------------------------------------------------------------------------------------
@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=0)
def _dev_wanted_cols(alg, s):
    return alg.wanted_cols(s)


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=0, donate_argnums=1)
def _dev_step_tail(alg, s, h, beta, anorm, broke, beta_raw, finite):
    return alg.step_tail(s, h, beta, anorm, broke, beta_raw, finite)


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=0, donate_argnums=2)
def _dev_check(alg, op, s, vs, avs):
    return ThickRestartLanczos.update(alg, op, s, 1, vs, avs)


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=0, donate_argnums=2)
def _dev_decide(alg, op, s):
    return ThickRestartLanczos.update(
        alg, op, dict(s, plan=jnp.zeros((), jnp.int32)), 2, None, None
    )


@partial(jax.jit, compiler_options=_STEP_OPTIONS, static_argnums=0)
def _dev_finalize(alg, op, s):
    return ThickRestartLanczos.finalize(alg, op, s)


@partial(jax.jit, compiler_options=_STEP_OPTIONS)
def _dev_unit_sum(Y):
    acc = jax.tree_util.tree_leaves(Y)[0].dtype
    return _unit_sum(Y, acc)


def _split(state):
    dev = {k: v for k, v in state.items() if k != "V"}
    return dev, state["V"]


@dataclasses.dataclass(frozen=True)
class HostBasisLanczos(ThickRestartLanczos):
    """:class:`ThickRestartLanczos` with its basis in host memory (``eigsh(basis="host")``).

    The state's ``"V"`` is the basis on the host's CPU device; every other entry is the device
    mode's, plus the pending basis rewrite (``plan``, ``plan_C``, ``plan_key``). The phases,
    decisions and numbers are those of :class:`ThickRestartLanczos`.
    """

    host_steps: ClassVar[bool] = True

    # --- inside the compiled decisions: record the rewrite instead of doing it ---------------
    def rewrite(self, s, kind: str, arg, key, wl):  # noqa: ARG002
        plan = jnp.where(s["plan"] == _NONE, _PLANS[kind], -1).astype(jnp.int32)
        s = dict(s, plan=plan)
        if kind != "reset":  # (reset: the start vector is the sum of the state's Ritz vectors)
            s["plan_C"] = jnp.zeros_like(s["plan_C"]).at[:, : arg.shape[1]].set(arg)
        if kind == "lock":
            s["plan_key"] = key
        return s

    # --- the driver's interface (called from Python by the host driver) ----------------------
    def prepare(self, op, state, phase):
        if phase == 2:
            return None
        dev, V = _split(state)
        j = _to_host(dev["j"])
        if phase == 0:
            dtypes = tuple(str(jnp.result_type(x)) for x in jax.tree_util.tree_leaves(op.like))
            return _to_device(_host_row(V, j, dtypes), op.like)
        cols = _small(_dev_wanted_cols(self, dev))
        return _to_device(_host_unit_ritz(V, cols, _acc_name(op)), op.like)

    def update(self, op, state, phase, vs, avs):
        dev, V = _split(state)
        if phase == 0:
            w = _to_host(jax.tree_util.tree_map(lambda x: x[0], avs))
            at = _to_host({k: dev[k] for k in ("j", "anorm", "key", "restarts", "locks")})
            V, ext = _host_extend(self, V, at, w)
            dev = _dev_step_tail(self, dev, *_small(ext))
        elif phase == 1:
            dev = _dev_check(self, op, dev, vs, avs)
        else:
            dev = _dev_decide(self, op, dev)
            V = self.apply_plan(op, dev, V)
        return dict(dev, V=V)

    def apply_plan(self, op, dev, V):
        """Apply the rewrite the last decision recorded (if any) to the host basis."""
        plan = int(np.asarray(dev["plan"]))
        acc = _acc_name(op)
        if plan == _LOCK:
            cols = np.asarray(dev["plan_C"])[:, : self.k_total]
            return _host_locked(V, cols, _to_host(dev["plan_key"]), self.k_total, acc)
        if plan == _RESTART:
            return _host_restarted(V, np.asarray(dev["plan_C"])[:, : self.p], acc)
        if plan == _RESET:
            return _host_reset(V, _to_host(_dev_unit_sum(dev["Y"])))
        if plan != _NONE:  # pragma: no cover - an internal error, not a user's
            raise RuntimeError(f"eigsh(basis='host'): invalid basis rewrite plan {plan}.")
        return V

    def finalize(self, op, state):
        return _dev_finalize(self, op, _split(state)[0])


def _acc_name(op) -> str:
    return jnp.dtype(acc_dtype(op.like)).name


def host_initial_state(alg: HostBasisLanczos, state: dict, v0) -> dict:
    """The initial state built without the basis, plus the host basis (``v0`` in row 0).

    ``v0`` is the unit start vector (on the device).
    """
    acc = jnp.result_type(state["anorm"]).name
    V = _host_empty(_to_host(v0), alg.m + 1, alg.basis_dtype or acc, acc)
    return dict(state, V=V)
