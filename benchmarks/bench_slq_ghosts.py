"""Ghost Ritz values of SLQ without reorthogonalisation, measured.

``hvp.spectral_density(..., reorthogonalize=False)`` keeps 3 vectors per probe instead of
``num_iters + 1``, but its Lanczos basis loses orthogonality once Ritz values converge, and the
tridiagonal matrix then holds ghost copies of the converged (outlying) eigenvalues. This script
measures what that does to the density, against the reorthogonalised run and the exact spectrum,
as the number of Lanczos steps grows.

Operator: a diagonal float64 matrix of size ``n = 2000`` with a Hessian-like spectrum: a bulk
(``|N(0, 1)| * 0.05`` with some negative values) and 10 outliers from 1 to 50. For each
``num_iters`` and each mode (8 probes, the same key): the Wasserstein-1 distance to the exact
spectrum (relative to the spectral range) and the quadrature mass placed near the top eigenvalue
(``> 0.99 * lambda_max``; exact mass ``1/n``), where ghost copies show up as extra mass.

Run: ``python -m benchmarks.bench_slq_ghosts`` (about a minute on 2 cores); results in
``benchmarks/results/cpu/slq_ghosts.{md,json}``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._common import Report, environment, print_markdown

STEPS = (10, 20, 40, 80, 160)


def run(*, quick: bool = False, out: str | None = None) -> dict:
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import hvp
    from hvp.linalg import wasserstein1

    n = 300 if quick else 2000
    steps = (10, 20) if quick else STEPS
    rng = np.random.default_rng(0)
    bulk = 0.05 * rng.standard_normal(n - 10)
    spectrum = np.sort(np.concatenate([bulk, np.geomspace(1.0, 50.0, 10)]))
    d = jnp.asarray(spectrum)
    op = hvp.from_matvec(lambda v: d * v, like=jnp.zeros(n))
    span = spectrum[-1] - spectrum[0]
    top = spectrum[-1]
    rows, data = [], []
    for m in steps:
        row = {"num_iters": m}
        for reorth in (True, False):
            sd = hvp.spectral_density(
                op, key=jax.random.key(0), num_probes=8, num_iters=m, reorthogonalize=reorth
            )
            nodes, w = np.asarray(sd.nodes), np.asarray(sd.weights)
            w1 = wasserstein1(nodes, w, spectrum) / span
            mass_top = float(np.sum(w[nodes > 0.99 * top]) / nodes.shape[0])
            copies = float(np.mean(np.sum(nodes > 0.99 * top, axis=1)))
            tag = "reorth" if reorth else "plain"
            row.update({f"w1_{tag}": w1, f"mass_top_{tag}": mass_top, f"copies_top_{tag}": copies})
        data.append(row)
        rows.append(
            [
                m,
                f"{row['w1_reorth']:.2e}",
                f"{row['w1_plain']:.2e}",
                f"{row['copies_top_reorth']:.2f}",
                f"{row['copies_top_plain']:.2f}",
                f"{row['mass_top_reorth']:.2e}",
                f"{row['mass_top_plain']:.2e}",
            ]
        )
    out_dir = (
        Path(out)
        if out
        else Path(tempfile.mkdtemp(prefix="hvp-ghosts-"))
        if quick
        else Path(__file__).parent / "results" / "cpu"
    )
    report = Report("slq_ghosts", "SLQ without reorthogonalisation: ghost Ritz values", out_dir)
    report.quick = quick
    report.data.update(environment=environment(), n=n, rows=data, exact_mass_top=1.0 / n)
    report.table(
        f"Density error and ghost copies of the top eigenvalue (n = {n}, 8 probes)",
        [
            "num_iters",
            "W1/range reorth",
            "W1/range plain",
            "Ritz values at top, reorth",
            "at top, plain",
            "mass at top, reorth",
            "mass at top, plain",
        ],
        rows,
        note=(
            f"Exact mass at the top eigenvalue: 1/n = {1.0 / n:.1e}. 'Ritz values at top': Ritz "
            "values above 0.99 lambda_max per probe (1 when the top eigenvalue has converged; "
            "more are ghost copies). W1/range: Wasserstein-1 distance to the exact spectrum "
            "divided by the spectral range."
        ),
    )
    payload = report.write()
    print_markdown(report.markdown())
    return payload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_slq_ghosts", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    run(quick=args.quick, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
