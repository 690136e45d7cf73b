"""Random probe vectors shared by the estimators (Hutchinson, Hutch++, XTrace, diagonal, SLQ).

Probe ``i`` is drawn from ``jax.random.fold_in(key, i)``, so it does not depend on how the
probes are grouped into blocks, chunks or rounds, nor on the driver: the same key gives the same
probes, and therefore the same estimate, whichever block size or chunk size runs them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hvp import tree as tu

__all__ = ["PROBE_KINDS", "block_schedule", "next_phase", "probe", "probes", "unit_block"]

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
