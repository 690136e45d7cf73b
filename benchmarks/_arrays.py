"""Weights and data of the benchmark problems as NumPy arrays (no JAX, no PyTorch import).

The JAX models (:mod:`benchmarks._models`) and their PyTorch twins
(:mod:`benchmarks.peers_torch`) are both built from these arrays, so the two sides
hold the same numbers, and a cold PyTorch process (``bench_cold_warm``) does not pay
for importing JAX.

* :func:`mlp_params_np` - the tanh MLP ``64-w-w-10`` (NumPy seed 0), on the digits
  (:func:`digits_np`, all 1,797 scikit-learn digits, no download).
* :func:`lm_params_np` / :func:`lm_tokens_np` - the small transformer language model
  (pre-norm, causal, ``d_model`` 64, 2 blocks, 4 heads, MLP 4x, vocabulary 512, learned
  positions; 168,192 parameters) on random tokens (4 sequences of 32 tokens).
"""

from __future__ import annotations

import functools

import numpy as np

#: The small transformer LM of the cold/warm benchmark (168,192 parameters).
LM_CONFIG = dict(vocab=512, seq_len=32, d_model=64, heads=4, layers=2, batch=4, seed=0)


def mlp_size(width: int) -> int:
    """Number of parameters of the ``64-w-w-10`` MLP."""
    return 64 * width + width + width * width + width + width * 10 + 10


@functools.cache
def digits_np():
    """``(x (1797, 64) float64 in [0, 1], y (1797,) int32)``: scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float64)
    y = d.target.astype(np.int32)
    return x, y


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


def lm_size(vocab, seq_len, d_model, layers, **_) -> int:
    """Number of parameters of :func:`lm_params_np`."""
    d = d_model
    block = 2 * 2 * d + 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + seq_len * d + layers * block + 2 * d + d * vocab + vocab


def lm_params_np(
    *, vocab=512, seq_len=32, d_model=64, heads=4, layers=2, seed=0, **_
) -> dict[str, object]:
    """The transformer LM's parameters, laid out as the NNX model's ``nnx.Param`` state.

    ``{"embed": {"embedding": (V, d)}, "pos": (T, d), "blocks": {i: {"ln1", "attn":
    {"query", "key", "value", "out"}, "ln2", "fc1", "fc2"}}, "ln_f", "head"}`` with
    ``Linear`` layers as ``{"kernel": (in, out), "bias": (out,)}`` (``x @ kernel + bias``,
    JAX's layout, kept as is by the PyTorch twin) and ``LayerNorm`` as ``{"scale", "bias"}``.
    Float64; kernels ``N(0, 1/fan_in)``, biases ``N(0, 0.01^2)``, LayerNorm scales
    ``1 + N(0, 0.1^2)`` (a generic point, not an initialisation with special structure).
    """
    rng = np.random.default_rng(seed)
    d = d_model

    def linear(fan_in, fan_out):
        return {
            "kernel": rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in),
            "bias": 0.01 * rng.standard_normal(fan_out),
        }

    def norm():
        return {"scale": 1.0 + 0.1 * rng.standard_normal(d), "bias": 0.1 * rng.standard_normal(d)}

    params = {
        "embed": {"embedding": rng.standard_normal((vocab, d))},
        "pos": 0.1 * rng.standard_normal((seq_len, d)),
        "blocks": {},
    }
    for i in range(layers):
        params["blocks"][i] = {
            "ln1": norm(),
            "attn": {name: linear(d, d) for name in ("query", "key", "value", "out")},
            "ln2": norm(),
            "fc1": linear(d, 4 * d),
            "fc2": linear(4 * d, d),
        }
    params["ln_f"] = norm()
    params["head"] = linear(d, vocab)
    return params


def lm_tokens_np(*, vocab=512, seq_len=32, batch=4, seed=0, **_) -> np.ndarray:
    """``(batch, seq_len + 1)`` int32 random tokens: inputs ``[:, :-1]``, next-token targets ``[:, 1:]``."""
    rng = np.random.default_rng(seed + 1)
    return rng.integers(0, vocab, size=(batch, seq_len + 1)).astype(np.int32)


def flatten(tree, prefix=()) -> list[tuple[tuple, np.ndarray]]:
    """``[(path, array), ...]`` of a nested dict, keys sorted (JAX's flattening order)."""
    if isinstance(tree, dict):
        out = []
        for k in sorted(tree):
            out += flatten(tree[k], prefix + (k,))
        return out
    return [(prefix, tree)]
