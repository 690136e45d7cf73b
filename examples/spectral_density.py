"""Spectral density of a tanh-MLP Hessian on scikit-learn digits, by stochastic Lanczos quadrature.

Writes ``docs/figures/spectral_density_mlp.png``: the Gaussian-broadened SLQ
density (log scale) from :func:`hvp.linalg.spectral_density`, with a histogram
of the exact eigenvalues (``numpy.linalg.eigh`` of the dense Hessian) as
overlay, and the top/bottom eigenvalues from :func:`hvp.linalg.eigsh`.

Run from the repository root::

    python examples/spectral_density.py [--probes 32] [--iters 80] [--out docs/figures/spectral_density_mlp.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import hvp  # noqa: E402
from hvp.linalg import eigsh, spectral_density  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from problems import mlp  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=os.path.join("docs", "figures", "spectral_density_mlp.png")
    )
    args = parser.parse_args(argv)

    prob = mlp()
    h = hvp.hessian(prob.loss_fn, prob.params, prob.batches)
    key = jax.random.PRNGKey(args.seed)
    sd = spectral_density(h, key=key, num_probes=args.probes, num_iters=args.iters)
    exact = np.linalg.eigvalsh(np.asarray(h.dense()))
    ends = eigsh(h, 5, which="both", key=key, tol=1e-10)

    rng = exact.max() - exact.min()
    w1 = sd.wasserstein1(exact)
    grid = sd.grid(num=3000)
    sigma = 0.005 * rng
    dens = sd.density(grid, sigma=sigma)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    counts, _, _ = ax.hist(
        exact, bins=120, density=True, color="0.8", label=f"exact eigenvalues (eigh, n={h.size})"
    )
    ax.plot(
        grid,
        dens,
        color="C0",
        lw=1.5,
        label=f"SLQ: {args.probes} probes x {args.iters} Lanczos steps (sigma={sigma:.3g})",
    )
    for i, lam in enumerate(np.asarray(ends.eigenvalues)):
        ax.axvline(
            lam,
            color="C3",
            lw=0.8,
            ls="--",
            label="eigsh: 5 smallest / 5 largest" if i == 0 else None,
        )
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 5 * max(float(dens.max()), float(counts.max())))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(
        f"tanh-MLP Hessian on digits: W1(SLQ, exact) = {w1 / rng:.2%} of the range, "
        f"negative mass {sd.negative_mass():.1%} (exact {np.mean(exact < 0):.1%})",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(
        f"wrote {args.out}; n={h.size}, SLQ matvecs {int(sd.num_matvecs)}, W1/range {w1 / rng:.4f}, "
        f"eigsh matvecs {int(ends.num_matvecs)}"
    )


if __name__ == "__main__":
    main()
