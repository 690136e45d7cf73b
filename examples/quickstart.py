"""Quickstart: the Hessian of a small tanh MLP on the digits data set, matrix-free.

Builds ``H = hvp.hessian(loss, params, batches)`` over several batches (the last
one smaller), takes ``H @ v`` for a random direction ``v`` and checks it
against the dense Hessian from ``jax.hessian`` in float64. No Flax, no
download (the digits ship with scikit-learn); runs in a few seconds on a CPU.

    python examples/quickstart.py
"""

from __future__ import annotations

import time

import jax

jax.config.update("jax_enable_x64", True)  # float64 for the comparison with jax.hessian

import jax.numpy as jnp  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import hvp  # noqa: E402


def init_mlp(key, sizes=(64, 16, 10)):
    """Parameters of a tanh MLP as a dict of layers: ``{"layer0": {"w", "b"}, ...}``."""
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "w": jax.random.normal(sub, (m, n)) * jnp.sqrt(2.0 / (m + n)),
            "b": jnp.zeros(n),
        }
    return params


def mlp(params, x):
    layers = [params[k] for k in sorted(params)]
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def loss(params, batch):
    """Mean softmax cross-entropy of the MLP on one batch ``(images, labels)``."""
    x, y = batch
    return hvp.losses.softmax_cross_entropy(mlp(params, x), y)


def load_batches(num_examples=500, batch_size=128):
    digits = load_digits()
    x = jnp.asarray(digits.data[:num_examples] / 16.0 - 0.5)
    y = jnp.asarray(digits.target[:num_examples])
    return [
        (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, num_examples, batch_size)
    ]


def main() -> dict:
    batches = load_batches()
    params = init_mlp(jax.random.PRNGKey(0))
    n = hvp.tree.size(params)
    print(
        f"tanh MLP 64-16-10: {n} parameters, {len(batches)} batches "
        f"({', '.join(str(len(b[1])) for b in batches)} examples)"
    )

    # the Hessian of the mean loss over all 500 examples, as a matrix-free operator
    H = hvp.hessian(loss, params, batches)
    v = hvp.tree.normal_like(jax.random.PRNGKey(1), params)

    t0 = time.perf_counter()
    hv = jax.block_until_ready(H @ v)  # first product: traces and compiles
    t_first = time.perf_counter() - t0
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        hv = jax.block_until_ready(H @ v)
    t_mv = (time.perf_counter() - t0) / reps

    # dense reference: jax.hessian on the raveled parameters over the concatenated data
    x = jnp.concatenate([b[0] for b in batches])
    y = jnp.concatenate([b[1] for b in batches])
    flat, unravel = hvp.tree.ravel(params), hvp.tree.unravel_fn(params)
    t0 = time.perf_counter()
    dense = jax.block_until_ready(jax.jit(jax.hessian(lambda f: loss(unravel(f), (x, y))))(flat))
    t_dense = time.perf_counter() - t0

    ref = dense @ hvp.tree.ravel(v)
    rel_err = float(jnp.linalg.norm(hvp.tree.ravel(hv) - ref) / jnp.linalg.norm(ref))
    print(f"H @ v: first call (compile) {t_first:.2f} s, then {t_mv * 1e3:.2f} ms per product")
    print(f"dense jax.hessian ({n} x {n}): {t_dense:.2f} s")
    print(f"relative error vs jax.hessian: {rel_err:.3e}")
    return {
        "n": n,
        "relative_error": rel_err,
        "first_s": t_first,
        "matvec_s": t_mv,
        "dense_s": t_dense,
    }


if __name__ == "__main__":
    main()
