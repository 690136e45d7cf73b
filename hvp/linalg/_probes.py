"""Random probe vectors shared by the estimators (Hutchinson, Hutch++, XTrace, diagonal, SLQ).

Probe ``i`` is drawn from ``jax.random.fold_in(key, i)``, so it does not depend on how the
probes are grouped into blocks, chunks or rounds, nor on the driver: the same key gives the same
probes, and therefore the same estimate, whichever block size or chunk size runs them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hvp import tree as tu

__all__ = ["PROBE_KINDS", "probe", "probes"]

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
