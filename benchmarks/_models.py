"""The models and data shared by the benchmark groups.

* :func:`digits` - all 1,797 scikit-learn digits (8x8 images, 64 features scaled
  to [0, 1], 10 classes); bundled with scikit-learn, no download.
* :func:`mlp` - the tanh MLP ``64-w-w-10`` with softmax cross-entropy, weights
  drawn from NumPy seed 0 (``N(0, 1/fan_in)`` weights, ``N(0, 0.01)`` biases).
  ``n = w^2 + 76 w + 10`` parameters: w = 32 gives 3,466, w = 1024 gives 1,126,410.
  :func:`benchmarks.peers_torch` builds the same network in PyTorch from these arrays.
* :func:`cnn` - two 3x3 tanh convolutions and a dense head on the 8x8 images.
* :func:`transformer` - a small Flax (Linen) pre-norm transformer language model on
  random token sequences.

Each builder returns ``(params, loss_fn, batch)`` with ``loss_fn(params, batch)`` a mean loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def mlp_size(width: int) -> int:
    """Number of parameters of the ``64-w-w-10`` MLP."""
    return 64 * width + width + width * width + width + width * 10 + 10


@functools.cache
def _digits_np():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float64)
    y = d.target.astype(np.int32)
    return x, y


def digits(dtype=jnp.float32, num_examples: int | None = None):
    """``(x, y)``: inputs ``(N, 64)`` in ``dtype`` and integer labels ``(N,)``."""
    x, y = _digits_np()
    if num_examples is not None:
        x, y = x[:num_examples], y[:num_examples]
    return jnp.asarray(x, dtype), jnp.asarray(y)


def mlp_params_np(width: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Layer list ``[{"w": (in, out), "b": (out,)}, ...]`` as float64 NumPy arrays."""
    rng = np.random.default_rng(seed)
    sizes = [64, width, width, 10]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        b = 0.1 * rng.standard_normal(fan_out)
        layers.append({"w": w, "b": b})
    return layers


def mlp_apply(params, x):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def cross_entropy(logits, y):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def mlp_loss(params, batch):
    x, y = batch
    return cross_entropy(mlp_apply(params, x), y)


def mlp(width: int, *, dtype=jnp.float32, num_examples: int | None = None, seed: int = 0):
    """``(params, loss_fn, batch)`` for the tanh MLP ``64-width-width-10`` on the digits."""
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), mlp_params_np(width, seed))
    return params, mlp_loss, digits(dtype, num_examples)


# ------------------------------------------------------------------------------------------
# CNN on the 8x8 images
# ------------------------------------------------------------------------------------------
def _conv(x, w, b):
    y = jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + b


def cnn_apply(params, x):
    h = x.reshape(x.shape[0], 8, 8, 1)
    h = jnp.tanh(_conv(h, params["conv1"]["w"], params["conv1"]["b"]))
    h = jnp.tanh(_conv(h, params["conv2"]["w"], params["conv2"]["b"]))
    h = h.reshape(h.shape[0], -1)
    return h @ params["head"]["w"] + params["head"]["b"]


def cnn_loss(params, batch):
    x, y = batch
    return cross_entropy(cnn_apply(params, x), y)


def cnn(*, channels=(16, 32), dtype=jnp.float32, num_examples: int | None = None, seed: int = 0):
    """Two 3x3 tanh convolutions (``channels``) and a dense head: ``(params, loss_fn, batch)``."""
    rng = np.random.default_rng(seed)
    c1, c2 = channels

    def w(*shape, fan_in):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), dtype)

    params = {
        "conv1": {"w": w(3, 3, 1, c1, fan_in=9), "b": jnp.zeros((c1,), dtype)},
        "conv2": {"w": w(3, 3, c1, c2, fan_in=9 * c1), "b": jnp.zeros((c2,), dtype)},
        "head": {"w": w(64 * c2, 10, fan_in=64 * c2), "b": jnp.zeros((10,), dtype)},
    }
    return params, cnn_loss, digits(dtype, num_examples)


# ------------------------------------------------------------------------------------------
# small Flax transformer language model
# ------------------------------------------------------------------------------------------
def transformer(
    *,
    vocab=64,
    seq_len=32,
    d_model=64,
    heads=4,
    layers=2,
    batch=128,
    dtype=jnp.float32,
    seed: int = 0,
):
    """A pre-norm causal transformer LM (Flax Linen) on random tokens: ``(params, loss_fn, batch)``."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h):
            mask = nn.make_causal_mask(jnp.ones(h.shape[:2], jnp.int32))
            a = nn.SelfAttention(num_heads=heads, dtype=dtype, param_dtype=dtype)(
                nn.LayerNorm(dtype=dtype, param_dtype=dtype)(h), mask=mask
            )
            h = h + a
            m = nn.LayerNorm(dtype=dtype, param_dtype=dtype)(h)
            m = nn.Dense(4 * d_model, dtype=dtype, param_dtype=dtype)(m)
            m = nn.Dense(d_model, dtype=dtype, param_dtype=dtype)(nn.gelu(m))
            return h + m

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(vocab, d_model, dtype=dtype, param_dtype=dtype)(tokens)
            pos = self.param("pos", nn.initializers.normal(0.02), (seq_len, d_model), dtype)
            h = h + pos[None, : tokens.shape[1]]
            for _ in range(layers):
                h = Block()(h)
            h = nn.LayerNorm(dtype=dtype, param_dtype=dtype)(h)
            return nn.Dense(vocab, dtype=dtype, param_dtype=dtype)(h)

    model = LM()
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(batch, seq_len + 1)), jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), tokens[:, :-1])["params"]

    def loss_fn(p, toks):
        logits = model.apply({"params": p}, toks[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

    return params, loss_fn, tokens


def num_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
