"""Shared helper of the analysis tests: write a parameter tree as an Orbax checkpoint."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


def save_checkpoint(path, tree) -> str:
    """Save ``tree`` with ``StandardCheckpointer`` at ``path``; returns the absolute path."""
    path = os.path.abspath(path)
    ck = ocp.StandardCheckpointer()
    ck.save(path, tree)
    ck.wait_until_finished()
    ck.close()
    return path
