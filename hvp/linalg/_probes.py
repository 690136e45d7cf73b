"""Random probe vectors shared by the estimators (Hutchinson, Hutch++, XTrace, diagonal, SLQ).

Probe ``i`` is drawn from ``jax.random.fold_in(key, i)``, so it does not depend on how the
probes are grouped into blocks, chunks or rounds, nor on the driver: the same key gives the same
probes, and therefore the same estimate, whichever block size or chunk size runs them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hvp import tree as tu
from hvp.linalg._driver import StateMachine

__all__ = [
    "PROBE_KINDS",
    "ProbeBudget",
    "block_schedule",
    "initial_counters",
    "next_phase",
    "probe",
    "probes",
    "unit_block",
]

PROBE_KINDS = ("rademacher", "normal")


def probe(key, like, kind: str):
    """One random probe shaped like ``like``: ``"rademacher"`` (+-1) or ``"normal"``."""
    if kind == "rademacher":
        return tu.rademacher_like(key, like)
    if kind == "normal":
        return tu.normal_like(key, like)
    raise ValueError(f"Unknown probe kind {kind!r}; expected one of {PROBE_KINDS}.")


def probes(key, like, count: int, kind: str, start=0):
    """Probes ``start, ..., start+count-1`` stacked on a leading axis (a block of ``count`` rows)."""
    idx = start + jnp.arange(count)
    return jax.vmap(lambda i: probe(jax.random.fold_in(key, i), like, kind))(idx)


def unit_block(like, start, size: int):
    """The coordinate vectors ``e_start, ..., e_{start+size-1}`` (ravel order) as a block.

    The exact paths' "probes" (``n`` products give the exact answer). ``start`` may be traced;
    rows past ``n`` are zero.
    """
    n = tu.size(like)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(like))
    idx = start + jnp.arange(size)
    flat = (idx[:, None] == jnp.arange(n)[None, :]).astype(dtype)
    return jax.vmap(tu.unravel_fn(like))(flat)


def block_schedule(total: int, chunk: int) -> tuple[int, ...]:
    """Block sizes of a fixed budget's phases: full chunks of ``chunk``, then one remainder block."""
    rem = total % chunk
    return (chunk, rem) if rem and total > chunk else (min(chunk, total),)


def next_phase(done_count, total: int, chunk: int):
    """Phase (of :func:`block_schedule`) of the next step after ``done_count`` products."""
    return jnp.where(total - done_count >= chunk, 0, 1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ProbeBudget(StateMachine):
    """Base of the fixed-budget probe estimators (:func:`hvp.diagonal`, :func:`hvp.frobenius_norm`).

    Settings (static, they fix the shapes): ``total`` products, ``chunk`` products per step
    (phases of :func:`block_schedule`), ``exact`` (unit vectors ``e_i`` instead of Rademacher
    probes, ``total = n``). Each step multiplies the next block of probes: :meth:`prepare` gives
    it, :meth:`advance` the counters after it; subclasses implement ``update`` and ``finalize``.
    The state holds ``key`` (Hutchinson) and the counters of :func:`initial_counters`.
    """

    total: int
    chunk: int
    exact: bool = False

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return block_schedule(self.total, self.chunk)

    def prepare(self, op, state, phase):
        b = self.block_sizes[phase]
        if self.exact:
            return unit_block(op.like, state["matvecs"], b)
        return probes(state["key"], op.like, b, "rademacher", start=state["matvecs"])

    def advance(self, state, phase) -> dict:
        """The counters ``matvecs``, ``phase`` and ``done`` after this step's block."""
        matvecs = state["matvecs"] + self.block_sizes[phase]
        return dict(
            matvecs=matvecs,
            phase=next_phase(matvecs, self.total, self.chunk),
            done=matvecs >= self.total,
        )


def initial_counters() -> dict:
    """A state's counters before the first product: ``matvecs``, ``phase`` and ``done``."""
    return dict(
        matvecs=jnp.zeros((), jnp.int32), phase=jnp.zeros((), jnp.int32), done=jnp.array(False)
    )
