"""The tiny model of ``test_multihost_analyze.py``: ``--model tests/scale/multihost_analyze_model.py:tiny_mlp``.

An NNX MLP ``4 -> 5 -> 3`` with tanh (43 parameters) and the cross-entropy loss; :func:`save`
writes its checkpoint and :func:`save_data` a ``.npz`` data set of 32 examples.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx


class TinyMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.hidden = nnx.Linear(4, 5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.tanh(self.hidden(x)))


def tiny_mlp():
    """The model factory: ``(model, loss)``."""
    return TinyMLP(rngs=nnx.Rngs(0)), "cross_entropy"


def save(path) -> None:
    """A checkpoint of the model at other (random, non-zero-bias) parameters."""
    import jax
    import orbax.checkpoint as ocp

    model = TinyMLP(rngs=nnx.Rngs(3))
    state = nnx.state(model)
    state = jax.tree_util.tree_map(
        lambda a: a + 0.3 * np.cos(np.arange(a.size)).reshape(a.shape), state
    )
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(path), state)
    ck.wait_until_finished()
    ck.close()


def save_data(path, n: int = 32) -> None:
    """``x`` (n, 4) float and ``y`` (n,) labels in 0..2."""
    rs = np.random.RandomState(0)
    x = rs.randn(n, 4)
    y = rs.randint(0, 3, n).astype(np.int32)
    np.savez(path, x=x, y=y)
