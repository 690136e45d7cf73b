r"""The critical-point and compression sections of the ``hvp analyze`` report.

* **critical point** (always; cheap): the gradient norm over the data set
  (:func:`hvp.operators.data_gradient`, one gradient per batch) and the extreme eigenvalues that
  the report's eigsh stages already computed, classified by the second-derivative test of
  :func:`hvp.critical.critical_verdict` with the tolerances stated in the section: the point is
  critical when :math:`\lVert\nabla L\rVert \le` ``grad_tol`` and an eigenvalue counts as zero
  when :math:`|\lambda| \le \max(\epsilon, r_{\min}, r_{\max})` (:math:`\epsilon` the report's
  zero threshold, :math:`r` the residual bounds). A GGN is positive semi-definite by
  construction: with ``--operator ggn`` a critical point is reported as inconclusive.
* **compression** (``--compression``; costs ``--layer-matvecs`` probes plus one Lanczos run per
  layer): HAWQ per-layer quantisation sensitivities :math:`\Omega_l(b)` for 2, 4 and 8 bits
  (:func:`hvp.compression.quantization_sensitivity`), the greedy bit allocation at 4 bits per
  weight on average, and a summary of the OBD saliencies
  (:func:`hvp.compression.obd_saliency`, from the same Hutchinson diagonal: no extra products);
  ``compression.png`` shows the per-layer sensitivities.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from hvp import tree as tu
from hvp._io import atomic_savefig

__all__ = [
    "CriticalSection",
    "CompressionSection",
    "critical_section",
    "compression_section",
    "plot_compression",
    "GRAD_TOL",
    "COMPRESSION_BITS",
]

#: Gradient-norm tolerance of the critical-point section (absolute, on the mean loss).
GRAD_TOL = 1e-3
#: Bit widths of the compression section, and the average of its bit allocation.
COMPRESSION_BITS = (2, 4, 8)
ALLOCATION_BITS = 4.0
#: Sparsities at which the compression section reports the OBD pruning summary.
SPARSITIES = (0.5, 0.9)


@tu.result(static=("verdict", "kind", "operator"))
class CriticalSection:
    r"""What kind of point the checkpoint's parameters are at (second-derivative test).

    Attributes:
      verdict: ``"local minimum"``, ``"saddle point"``, ``"local maximum"``, ``"degenerate (flat
        directions): test inconclusive"``, ``"not a critical point: gradient norm X"``, or with a
        GGN ``"inconclusive: the GGN ..."``.
      kind: ``"minimum"``, ``"saddle"``, ``"maximum"``, ``"degenerate"``, ``"not critical"`` or
        ``"inconclusive"``.
      operator: the curvature the eigenvalues are of (``"hessian"`` or ``"ggn"``).
      gradient_norm: :math:`\lVert\nabla L\rVert_2` over the data set.
      grad_tol: the tolerance it is compared with.
      lambda_min, lambda_max: from the report's bottom and top eigenpairs.
      lambda_min_error, lambda_max_error: their residual bounds.
      zero_threshold: eigenvalues of magnitude at most this count as zero.
      seconds: time of the gradient.
      converged: both extreme eigenpairs met eigsh's tolerance (``None`` in reports written
        before it was recorded). When ``False`` the verdict ends with "unverified": a Ritz value
        that did not converge lies within its residual of *an* eigenvalue, not necessarily the
        extreme one (e.g. a missed negative eigenvalue would turn a minimum into a saddle).

    Examples:
      >>> from hvp.analysis import CriticalSection
      >>> sec = CriticalSection(verdict="saddle point", kind="saddle", operator="hessian",
      ...                       gradient_norm=1e-5, grad_tol=1e-3, lambda_min=-1.0, lambda_max=2.0,
      ...                       lambda_min_error=1e-6, lambda_max_error=1e-6, zero_threshold=1e-4,
      ...                       seconds=0.1)
      >>> sec.to_dict()["verdict"]
      'saddle point'
    """

    verdict: str
    kind: str
    operator: str
    gradient_norm: float
    grad_tol: float
    lambda_min: float
    lambda_max: float
    lambda_min_error: float
    lambda_max_error: float
    zero_threshold: float
    seconds: float
    converged: bool | None = None


@tu.result(static=("layers", "bits", "obd_note"))
class CompressionSection:
    r"""Per-layer quantisation sensitivity (HAWQ) and an OBD pruning summary.

    Attributes:
      layers: layers with kernels (leaves of two or more axes), in parameter order.
      bits: the bit widths of the columns of ``omega``.
      num_params: kernel weights per layer.
      trace, trace_std_error: :math:`\operatorname{tr}(A_{ll})` over the kernels, and its error.
      top_eigenvalue, top_eigenvalue_residual: the largest eigenvalue of each kernel block.
      top_eigenvalue_converged: whether each of them converged (``None`` without them or in
        reports written before it was recorded); the table marks the others "(not converged)".
      omega, omega_std_error: :math:`\Omega_l(b)`, ``(layers, bits)``.
      ranking: layers, most sensitive first (at the fewest bits).
      allocation_bits: the greedy allocation at ``allocation_average`` bits per weight.
      allocation_average: its budget, bits per kernel weight on average.
      allocation_objective: :math:`\sum_l \Omega_l(b_l)` of the allocation.
      obd_saliency_total: :math:`\sum_i \tfrac12 A_{ii} w_i^2` per layer (the OBD estimate of the
        loss increase of removing the whole kernel).
      obd_pruned_saliency: per sparsity of :data:`SPARSITIES` (global OBD mask), the summed
        saliency of the pruned weights, ``{"0.5": value, ...}``.
      num_matvecs: products used (probes + Lanczos).
      seconds: time of the section.
      obd_num_negative: kernel weights whose OBD saliency :math:`\tfrac12 A_{ii} w_i^2` is
        negative (a negative diagonal entry of the curvature).
      obd_note: empty, or (with the Hessian, at a point that is not critical or with negative
        saliencies) why OBD's ranking is unreliable there and what to use instead: OBD assumes a
        minimum (gradient about zero, positive semi-definite curvature), and the GGN
        (``--operator ggn``) is positive semi-definite everywhere.

    Examples:
      >>> import numpy as np
      >>> from hvp.analysis import CompressionSection
      >>> sec = CompressionSection(layers=("dense",), bits=(2, 4, 8), num_params=np.array([6]),
      ...     trace=np.array([2.0]), trace_std_error=np.array([0.1]), top_eigenvalue=np.array([1.5]),
      ...     top_eigenvalue_residual=np.array([1e-4]), omega=np.ones((1, 3)),
      ...     omega_std_error=np.zeros((1, 3)), ranking=("dense",), allocation_bits=(4,),
      ...     allocation_average=4.0, allocation_objective=1.0, obd_saliency_total=np.array([0.3]),
      ...     obd_pruned_saliency={"0.5": 0.01}, num_matvecs=10, seconds=0.5)
      >>> sec.to_dict()["ranking"]
      ['dense']
    """

    layers: tuple
    bits: tuple
    num_params: Any
    trace: Any
    trace_std_error: Any
    top_eigenvalue: Any
    top_eigenvalue_residual: Any
    omega: Any
    omega_std_error: Any
    ranking: Any
    allocation_bits: Any
    allocation_average: float
    allocation_objective: float
    obd_saliency_total: Any
    obd_pruned_saliency: dict
    num_matvecs: int
    seconds: float
    obd_num_negative: int = 0
    obd_note: str = ""
    top_eigenvalue_converged: Any = None


def _obd_note(operator: str, gradient_norm, num_negative: int, num_weights: int) -> str:
    """Why OBD saliencies may mislead at this point (``""`` when nothing needs saying)."""
    not_critical = gradient_norm is not None and gradient_norm > GRAD_TOL
    if operator != "hessian" or not (not_critical or num_negative):
        return ""
    found = []
    if not_critical:
        found.append(
            f"the gradient norm is {gradient_norm:.3g} > {GRAD_TOL:g} (not a critical point)"
        )
    if num_negative:
        found.append(
            f"{num_negative} of {num_weights} kernel weights have negative saliency (negative "
            "diagonal curvature)"
        )
    return (
        "OBD assumes a minimum (gradient ~ 0, positive semi-definite curvature); here "
        + " and ".join(found)
        + ". Negative saliencies come from negative curvature or a non-critical point and do not "
        "estimate a loss increase: rank weights for compression with the GGN (--operator ggn), "
        "which is positive semi-definite at any point."
    )


def critical_section(
    op, top, bottom, *, operator: str, zero_threshold: float, seconds: float, gradient=None
) -> CriticalSection:
    """The critical-point section from the operator (for the gradient) and the eigsh results."""
    from hvp.critical import critical_verdict
    from hvp.operators import data_gradient

    g = data_gradient(op) if gradient is None else gradient
    gnorm = float(tu.norm(g))
    lam_top, res_top = np.asarray(top.eigenvalues, float), np.asarray(top.residuals, float)
    lam_bot, res_bot = np.asarray(bottom.eigenvalues, float), np.asarray(bottom.residuals, float)
    lo, r_lo = float(lam_bot[0]), float(res_bot[0])
    hi, r_hi = float(lam_top[-1]), float(res_top[-1])
    zero = max(float(zero_threshold), r_lo, r_hi)
    kind, verdict = critical_verdict(gnorm, lo, hi, grad_tol=GRAD_TOL, zero=zero)
    if operator != "hessian" and kind != "not critical":
        kind = "inconclusive"
        verdict = (
            "inconclusive: the GGN is positive semi-definite by construction and cannot tell a "
            "saddle point from a minimum (analyse with --operator hessian)"
        )
    converged = bool(np.asarray(bottom.converged, bool)[0] and np.asarray(top.converged, bool)[-1])
    if not converged and kind != "not critical":
        verdict += f" (unverified: {_unconverged_ends(top, bottom)} did not converge)"
    return CriticalSection(
        verdict=verdict,
        kind=kind,
        operator=operator,
        gradient_norm=gnorm,
        grad_tol=GRAD_TOL,
        lambda_min=lo,
        lambda_max=hi,
        lambda_min_error=r_lo,
        lambda_max_error=r_hi,
        zero_threshold=zero,
        seconds=float(seconds),
        converged=converged,
    )


def _unconverged_ends(top, bottom) -> str:
    """``"λ_min"``, ``"λ_max"`` or ``"λ_min and λ_max"``: the extreme pairs that did not converge."""
    ends = [
        name
        for name, sec, i in (("λ_min", bottom, 0), ("λ_max", top, -1))
        if not bool(np.asarray(sec.converged, bool)[i])
    ]
    return " and ".join(ends)


def compression_section(
    op, *, key, num_matvecs: int, chunk_size=None, operator: str = "hessian", gradient_norm=None
) -> CompressionSection:
    """The compression section: HAWQ sensitivities, an allocation, OBD totals (one diagonal).

    ``operator`` names the curvature of ``op`` and ``gradient_norm`` is the data-set gradient's
    norm (when known): with the Hessian at a non-critical point or with negative saliencies the
    section carries a note (:attr:`CompressionSection.obd_note`).
    """
    import time

    from hvp.compression import is_kernel, obd_saliency, quantization_sensitivity
    from hvp.linalg import diagonal

    t0 = time.perf_counter()
    k_diag, k_eig = jax.random.split(key)
    d = diagonal(op, key=k_diag, num_matvecs=num_matvecs, chunk_size=chunk_size, progress=False)
    sens = quantization_sensitivity(op, key=k_eig, bits=COMPRESSION_BITS, diag=d, progress=False)
    alloc = sens.allocate(average_bits=ALLOCATION_BITS)
    obd = obd_saliency(op, key=k_diag, diag=d)
    paths = tu.leaf_paths(obd.saliency)
    leaves = jax.tree_util.tree_leaves(obd.saliency)
    where = {name: i for i, name in enumerate(sens.layers)}
    totals = np.zeros(len(sens.layers))
    negative = weights = 0
    for p, s in zip(paths, leaves):
        layer = tu.layer_of(p)
        if layer in where and is_kernel(p, s):
            s64 = np.asarray(s, np.float64)
            totals[where[layer]] += float(np.sum(s64))
            negative += int(np.sum(s64 < 0))
            weights += s64.size
    pruned = {}
    for sp in SPARSITIES:
        mask = obd.mask(sp)
        pruned[str(sp)] = float(
            sum(
                np.sum(np.asarray(s, np.float64)[~np.asarray(m)])
                for s, m in zip(leaves, jax.tree_util.tree_leaves(mask))
            )
        )
    return CompressionSection(
        layers=sens.layers,
        bits=sens.bits,
        num_params=np.asarray(sens.num_params),
        trace=sens.trace,
        trace_std_error=sens.trace_std_error,
        top_eigenvalue=sens.top_eigenvalue,
        top_eigenvalue_residual=sens.top_eigenvalue_residual,
        top_eigenvalue_converged=sens.top_eigenvalue_converged,
        omega=sens.omega,
        omega_std_error=sens.omega_std_error,
        ranking=list(sens.ranking),
        allocation_bits=list(alloc.bits),
        allocation_average=ALLOCATION_BITS,
        allocation_objective=float(alloc.objective),
        obd_saliency_total=totals,
        obd_pruned_saliency=pruned,
        num_matvecs=int(d.num_matvecs) + int(sens.num_matvecs),
        seconds=time.perf_counter() - t0,
        obd_num_negative=negative,
        obd_note=_obd_note(operator, gradient_norm, negative, weights),
    )


def _get(report, name):
    return report.get(name) if isinstance(report, dict) else getattr(report, name, None)


def critical_rows(report) -> list[tuple[str, str]]:
    """``(figure, value)`` rows of the critical-point section for the terminal summary."""
    c = _get(report, "critical")
    if c is None:
        return []
    c = c if isinstance(c, dict) else c.to_dict()
    return [
        ("critical point", str(c["verdict"])),
        ("gradient norm", f"{c['gradient_norm']:.4g} (critical if <= {c['grad_tol']:g})"),
    ]


def compression_table(report):
    """A ``rich.table.Table`` of the per-layer sensitivities, or ``None`` without the section."""
    from rich.table import Table

    c = _get(report, "compression")
    if c is None:
        return None
    c = c if isinstance(c, dict) else c.to_dict()
    t = Table(
        title=(
            f"Quantisation sensitivity Ω_l(b) = tr(A_ll)/n_l·‖Q_b(W_l)−W_l‖² (HAWQ); allocation at "
            f"{c['allocation_average']:g} bits/weight on average"
        ),
        title_justify="left",
    )
    for col in ("layer", "n_l", "tr(A_ll) ± se", "λ_max(A_ll)"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for b in c["bits"]:
        t.add_column(f"Ω({b})", justify="right")
    t.add_column("bits", justify="right")
    for i, layer in enumerate(c["layers"]):
        top = c["top_eigenvalue"][i] if c["top_eigenvalue"] is not None else None
        flags = c.get("top_eigenvalue_converged")
        conv = True if flags is None else bool(flags[i])
        t.add_row(
            layer,
            str(c["num_params"][i]),
            f"{c['trace'][i]:.4g} ± {c['trace_std_error'][i]:.2g}",
            "" if top is None else f"{top:.4g}" + ("" if conv else " (not converged)"),
            *(f"{v:.3g}" for v in c["omega"][i]),
            str(c["allocation_bits"][i]),
        )
    pruned = ", ".join(f"{float(k):.0%}: {v:.3g}" for k, v in c["obd_pruned_saliency"].items())
    t.caption = f"OBD saliency of the weights pruned at {pruned} (global mask)"
    if c.get("obd_note"):
        t.caption += f"\nNote: {c['obd_note']}"
    return t


def plot_compression(report, path):
    """Bar chart of :math:`\\Omega_l(b)` per layer and bit width (log scale), written atomically.

    ``report`` is an :class:`~hvp.analysis.AnalysisReport` with a compression section (``hvp
    analyze --compression``) or its dict (a loaded ``report.json``); returns ``path``.

    Examples:
      >>> import os, tempfile
      >>> from hvp.analysis import plot_compression
      >>> section = {"layers": ["dense_0", "out"], "bits": [2, 4, 8],
      ...            "omega": [[0.1, 1e-3, 1e-6], [0.03, 5e-4, 2e-6]],
      ...            "omega_std_error": [[0.01, 1e-4, 1e-7], [0.003, 5e-5, 2e-7]]}
      >>> path = os.path.join(tempfile.mkdtemp(), "compression.png")
      >>> os.path.basename(plot_compression({"compression": section}, path))
      'compression.png'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    c = _get(report, "compression")
    c = c if isinstance(c, dict) else c.to_dict()
    omega = np.asarray(c["omega"], float)
    se = np.asarray(c["omega_std_error"], float)
    labels = tu.layer_labels(c["layers"]).short
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(c["bits"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) + 2), 3.8))
    for j, b in enumerate(c["bits"]):
        ax.bar(
            x + (j - (len(c["bits"]) - 1) / 2) * width,
            np.maximum(omega[:, j], 1e-30),
            width,
            yerr=se[:, j],
            label=f"{b} bits",
        )
    ax.set_yscale("log")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("Ω_l(b) = tr(A_ll)/n_l · ‖Q_b(W)−W‖²")
    ax.set_title("Quantisation sensitivity per layer (HAWQ)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return path
