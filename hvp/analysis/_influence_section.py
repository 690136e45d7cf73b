r"""The influence section of the ``hvp analyze`` report (``--influence``).

Which training examples drove the loss on a few test examples (Koh & Liang, 2017), computed by
:func:`hvp.influence` on the report's operator (the Hessian, or the GGN with ``--operator
ggn``) over the analysed data set:

.. math::

   \mathcal I(z_t, z_i) = -\nabla\ell(z_t)^\top (A + \mu I)^{-1} \nabla\ell(z_i),

negative for a *helpful* training example (removing it and retraining is predicted to raise the
test loss by :math:`-\mathcal I/n`), positive for a *harmful* one; and the self-influence
:math:`\nabla\ell(z_i)^\top (A + \mu I)^{-1} \nabla\ell(z_i)` of every training example (large:
outliers, mislabelled examples; Pruthi et al., 2020; Schioppa et al., 2022).

* **Test examples** (stated in the section's ``test_source``): the first
  ``--influence-num-test`` examples of the data spec ``--influence-test`` (a held-out split, any
  ``--data`` spec), or by default the **last** ``--influence-num-test`` examples of the analysed
  data set. Those are training examples too: each one's own score (:math:`-` its
  self-influence, always among the most helpful) is left out of its lists.
* **Training examples**: every example of the analysed data set, indexed in the order of its
  batches (``0 … n-1``).
* **Method** (``--influence-method``, default ``auto``): ``"dense"`` (the exact inverse from
  the dense matrix: :math:`n` products and :math:`n^2` memory) for models of at most
  :data:`DENSE_MAX_PARAMS` parameters, ``"solve"`` above (conjugate gradients on the damped
  operator for each test example, :func:`hvp.solve`, to the relative residual
  :data:`SOLVE_RTOL`: the scores are exact to that tolerance); ``"arnoldi"`` (the top
  ``--influence-rank`` eigenpairs from :func:`hvp.eigsh`, Schioppa et al., 2022: cheaper per
  test example, but it ignores the rest of the spectrum and ranked the demo model's training
  examples poorly, Spearman 0.2-0.4 against the exact scores at rank 20) on request. The
  self-influence needs one inverse per *training* example: exact with ``"dense"``, else from
  the Arnoldi variant (rank ``--influence-rank``; the report's top eigenpairs when the rank is
  at most ``-k``), which matched the exact self-influence of the demo model with Spearman 0.998.
* **Damping** :math:`\mu` (``--influence-damping``): by default
  :math:`\mu = \max(0, -\lambda_{\min}) + 10^{-3} \lambda_{\max}` from the report's extreme
  eigenvalues, the smallest shift that makes :math:`A + \mu I` positive definite with its
  smallest eigenvalue at least :math:`10^{-3}\lambda_{\max}` (Koh & Liang damp a non-convex
  Hessian for the same reason; the ridge also covers the null space of the data, e.g.
  always-blank pixels). The section states the value and the rule.

The section holds, per test example, the ``--influence-top`` most helpful and most harmful
training examples with their scores (and labels where the targets are integer labels), the
training examples of largest self-influence, the method, damping, rank, cost and whether the
inverse was applied as verified; for image-like inputs it also keeps the pixels of the examples
shown, so that ``influence.png`` can be drawn again from ``report.json``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp._io import atomic_savefig
from hvp.analysis._errors import AnalysisError

__all__ = [
    "InfluenceSection",
    "influence_section",
    "influence_table",
    "plot_influence",
    "INFLUENCE_METHODS",
    "DENSE_MAX_PARAMS",
    "RELATIVE_DAMPING",
    "INFLUENCE_KEY",
]

#: ``--influence-method`` choices.
INFLUENCE_METHODS = ("auto", "arnoldi", "solve", "dense")
#: ``auto`` uses the exact dense inverse up to this many parameters, the Arnoldi variant above.
DENSE_MAX_PARAMS = 1000
#: ``--influence-method dense`` refuses models larger than this (``n^2`` memory, ``n`` products).
DENSE_LIMIT = 20_000
#: Default damping: ``max(0, -lambda_min)`` plus this fraction of the report's largest eigenvalue.
RELATIVE_DAMPING = 1e-3
#: The section's key: ``fold_in(PRNGKey(seed), INFLUENCE_KEY)`` (outside the split of the other
#: stages, so ``--influence`` changes none of their figures).
INFLUENCE_KEY = 0x1F
#: Relative tolerance of the ``"solve"`` method's CG (float32, float64), on the true residual.
SOLVE_RTOL = {False: 1e-4, True: 1e-8}
#: Pixels of the examples shown are kept in the report for images of at most this many values.
MAX_IMAGE_SIZE = 4096


@tu.result(
    static=(
        "method",
        "operator",
        "method_rule",
        "damping_rule",
        "test_source",
        "self_influence_method",
    )
)
class InfluenceSection:
    r"""Most helpful / harmful training examples of a few test examples, and self-influence.

    Attributes:
      method: ``"dense"``, ``"arnoldi"`` or ``"solve"`` (what ran).
      method_rule: why (``"auto: dense (n <= 1000 parameters)"``, ``"auto: solve (CG; ...)"`` or
        ``"--influence-method"``).
      operator: the curvature inverted (``"hessian"`` or ``"ggn"``).
      damping: :math:`\mu`; ``damping_rule`` how it was set.
      rank: eigenpairs kept by the Arnoldi variant (scores or self-influence), else ``None``.
      self_influence_method: ``"dense"`` (exact), or ``"arnoldi (rank p)"`` for the
        ``"arnoldi"`` and ``"solve"`` methods (one solve per training example is too many).
      eigenpairs: where ``"arnoldi"`` took them: ``"the report's top eigenpairs"`` (``rank <=
        k``: no new products) or ``"hvp.eigsh (own key)"``; ``None`` for other methods.
      converged: the inverse was applied as verified (every eigenpair / solve converged).
      num_matvecs, num_gradients, seconds: cost (operator products, per-example gradients).
      num_train: training examples scored (the analysed data set).
      top: entries per list.
      test_source: where the test examples come from.
      test_indices: their indices in that source; ``test_labels`` their labels (or ``None``);
        ``test_loss`` their loss.
      self_excluded: the test examples are training examples; their own score is left out.
      helpful_indices, helpful_scores: ``(n_test, top)``, most negative score first;
        ``helpful_labels`` the labels (or ``None``).
      harmful_indices, harmful_scores, harmful_labels: the same, most positive first.
      self_influence_indices, self_influence_values, self_influence_labels: the ``top``
        training examples of largest self-influence.
      self_influence_mean: mean self-influence over the training set.
      image_shape: the shape the inputs are drawn with (``None``: not image-like).
      test_images, images: pixels of the test examples and of every training example listed
        (``{index: pixels}``), for image-like inputs of at most 4096 values.

    Examples:
      >>> from hvp.analysis import InfluenceSection
      >>> sec = InfluenceSection(method="dense", method_rule="--influence-method", operator="hessian",
      ...     damping=0.0, damping_rule="--influence-damping", rank=None, self_influence_method="dense", eigenpairs=None, converged=True, num_matvecs=4,
      ...     num_gradients=6, seconds=0.1, num_train=5, top=1, test_source="last 1 example",
      ...     test_indices=[4], test_labels=None, test_loss=[0.5], self_excluded=True,
      ...     helpful_indices=[[0]], helpful_scores=[[-1.0]], helpful_labels=None,
      ...     harmful_indices=[[2]], harmful_scores=[[0.3]], harmful_labels=None,
      ...     self_influence_indices=[3], self_influence_values=[2.0], self_influence_labels=None,
      ...     self_influence_mean=1.0, image_shape=None, test_images=None, images=None)
      >>> sec.to_dict()["helpful_indices"]
      [[0]]
    """

    method: str
    method_rule: str
    operator: str
    damping: float
    damping_rule: str
    rank: Any
    self_influence_method: str
    eigenpairs: Any
    converged: bool
    num_matvecs: int
    num_gradients: int
    seconds: float
    num_train: int
    top: int
    test_source: str
    test_indices: Any
    test_labels: Any
    test_loss: Any
    self_excluded: bool
    helpful_indices: Any
    helpful_scores: Any
    helpful_labels: Any
    harmful_indices: Any
    harmful_scores: Any
    harmful_labels: Any
    self_influence_indices: Any
    self_influence_values: Any
    self_influence_labels: Any
    self_influence_mean: float
    image_shape: Any
    test_images: Any
    images: Any


# ------------------------------------------------------------------------------------------------
# batches: concatenation, inputs and labels
# ------------------------------------------------------------------------------------------------
def concat_batches(batches):
    """One batch from a list of batches (leaves concatenated on the example axis, on the device)."""
    return jax.tree_util.tree_map(
        lambda *xs: jnp.asarray(np.concatenate([np.asarray(x) for x in xs])), *batches
    )


def take(batch, idx):
    """The examples ``idx`` of a batch."""
    idx = jnp.asarray(np.asarray(idx, np.int64))
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), batch)


def _inputs_targets(batch):
    """``(inputs, targets)`` of a batch of a known layout, else ``(None, None)``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for kx, ky in (("inputs", "targets"), ("x", "y"), ("image", "label")):
            if kx in batch:
                return batch[kx], batch.get(ky)
    return None, None


def _labels(batch):
    """Integer labels of the examples (a list of ints), or ``None`` for other targets."""
    _, y = _inputs_targets(batch)
    if y is None or not hasattr(y, "dtype"):
        return None
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        return None
    return [int(v) for v in y]


def image_shape(batch, data_spec) -> tuple | None:
    """The shape the inputs are drawn with, or ``None`` when they are not image-like.

    ``(H, W)`` or ``(H, W, C)`` inputs (``C`` 1 or 3, ``H, W >= 4``) are images; so are the flat
    64-pixel inputs of the ``digits`` data spec (8x8).
    """
    x, _ = _inputs_targets(batch)
    if x is None or not hasattr(x, "shape") or not np.issubdtype(x.dtype, np.floating):
        return None
    shape = tuple(int(s) for s in x.shape[1:])
    if len(shape) == 2 and min(shape) >= 4:
        return shape
    if len(shape) == 3 and shape[-1] in (1, 3) and min(shape[:2]) >= 4:
        return shape
    if shape == (64,) and isinstance(data_spec, str) and data_spec.startswith("digits"):
        return (8, 8)
    return None


def _pixels(batch, idx, shape):
    x, _ = _inputs_targets(batch)
    return np.asarray(x)[np.asarray(idx, np.int64)].reshape((len(idx), *shape))


def _sel(labels, idx):
    return None if labels is None else [labels[int(i)] for i in np.ravel(idx)]


# ------------------------------------------------------------------------------------------------
# the section
# ------------------------------------------------------------------------------------------------
def resolve_method(method: str, num_params: int) -> tuple[str, str]:
    """``(method, rule)``: the method that runs and why (``auto``: dense up to 1000 parameters, else solve)."""
    if method != "auto":
        if method == "dense" and num_params > DENSE_LIMIT:
            raise AnalysisError(
                f"--influence-method dense forms the {num_params} x {num_params} matrix "
                f"({num_params} products); it is refused above {DENSE_LIMIT:,} parameters. Use "
                "--influence-method arnoldi (or auto)."
            )
        return method, "--influence-method"
    if num_params <= DENSE_MAX_PARAMS:
        return "dense", f"auto: dense (n = {num_params} <= {DENSE_MAX_PARAMS} parameters)"
    return "solve", f"auto: solve (CG; n = {num_params} > {DENSE_MAX_PARAMS} parameters)"


#: Per-example gradients held at once by default: about this many numbers (64 MiB in float32).
GRADIENT_BUDGET = 1 << 24


def gradient_chunk(num_params: int) -> int:
    """Default per-example gradients per compiled chunk: ``GRADIENT_BUDGET / n`` in ``[1, 256]``.

    Examples:
      >>> from hvp.analysis._influence_section import gradient_chunk
      >>> gradient_chunk(2410), gradient_chunk(10**8)
      (256, 1)
    """
    return int(min(256, max(1, GRADIENT_BUDGET // max(1, num_params))))


def check_settings(method: str, rank: int, num_params: int) -> tuple[str, str]:
    """:func:`resolve_method`, and ``rank`` at most the number of parameters (for Arnoldi)."""
    method, rule = resolve_method(method, num_params)
    if method != "dense" and rank > num_params:
        raise AnalysisError(
            f"--influence-rank {rank} exceeds the number of parameters ({num_params}); use at "
            f"most {num_params}."
        )
    return method, rule


def influence_section(
    op,
    train,
    *,
    test=None,
    test_spec: str | None = None,
    data_spec=None,
    num_test: int = 3,
    top: int = 5,
    method: str = "auto",
    rank: int = 20,
    damping: float | None = None,
    lambda_max: float = 1.0,
    lambda_min: float = 0.0,
    key=None,
    chunk_size=None,
    eigsh=None,
) -> InfluenceSection:
    r"""The influence section: :func:`hvp.influence` with self-influence, ranked and summarised.

    Args:
      op: the report's curvature operator (over ``train``).
      train: the analysed data set as one batch (:func:`concat_batches` of its batches).
      test: a batch of held-out test examples (the first ``num_test`` are used), or ``None``:
        the last ``num_test`` examples of ``train`` (their own scores left out).
      test_spec: the data spec ``test`` came from (for ``test_source``).
      data_spec: the analysed data's spec (``digits`` inputs are drawn as 8x8 images).
      num_test: number of test examples.
      top: entries per list.
      method: ``"auto"``, ``"arnoldi"``, ``"solve"`` or ``"dense"`` (see the module docstring).
      rank: eigenpairs of ``"arnoldi"``.
      damping: :math:`\mu`, or ``None``: ``max(0, -lambda_min) + RELATIVE_DAMPING *
        max(lambda_max, 0)``.
      lambda_max: the report's largest eigenvalue.
      lambda_min: the report's smallest eigenvalue.
      key: PRNG key of the eigenpairs (``"arnoldi"`` without a usable ``eigsh``).
      chunk_size: per-example gradients computed at once (``None``: :func:`gradient_chunk`).
      eigsh: an :func:`hvp.eigsh` result of ``op`` with ``which="largest"`` and at least
        ``rank`` pairs (the report's top eigenpairs): ``"arnoldi"`` keeps its ``rank`` largest
        pairs and computes none (``key`` is then not used).

    Raises:
      AnalysisError: ``rank`` larger than the number of parameters, a singular damped matrix
        or eigenvalues below ``-damping`` (with the flag to change).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.analysis._influence_section import influence_section
      >>> x, y = jnp.eye(3), jnp.array([1.0, -1.0, 2.0])
      >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2), jnp.zeros(3), (x, y))
      >>> sec = influence_section(H, (x, y), num_test=1, top=2, damping=0.0)
      >>> sec.method, sec.test_indices, sec.self_influence_indices
      ('dense', [2], [2, 0])
    """
    from hvp.influence import influence as _influence
    from hvp.operators import batch_loss

    t0 = time.perf_counter()
    n_train = int(jax.tree_util.tree_leaves(train)[0].shape[0])
    n_params = int(op.size)
    method, method_rule = check_settings(method, rank, n_params)
    if damping is None:
        damping = max(0.0, -float(lambda_min)) + RELATIVE_DAMPING * max(float(lambda_max), 0.0)
        damping_rule = (
            f"max(0, -lambda_min) + {RELATIVE_DAMPING:g} * lambda_max of the report: A + damping I "
            "is positive definite"
        )
    else:
        damping_rule = "--influence-damping"
    if test is None:
        num_test = min(num_test, n_train)
        test_idx = list(range(n_train - num_test, n_train))
        test = take(train, test_idx)
        source = (
            f"the last {num_test} example{'s' if num_test > 1 else ''} of the analysed data "
            "(training examples: each one's own score is left out of its lists)"
        )
        excluded = True
        test_batch_for_labels = train
    else:
        n_avail = int(jax.tree_util.tree_leaves(test)[0].shape[0])
        num_test = min(num_test, n_avail)
        test_idx = list(range(num_test))
        test = take(test, test_idx)
        source = f"the first {num_test} example{'s' if num_test > 1 else ''} of --influence-test {test_spec}"
        excluded = False
        test_batch_for_labels = test
        test_idx_in_batch = list(range(num_test))
    if chunk_size is None:
        chunk_size = gradient_chunk(n_params)
    reused = None
    if method in ("arnoldi", "solve") and eigsh is not None and eigsh.which == "largest":
        lam = np.asarray(eigsh.eigenvalues)
        if lam.size >= rank:
            keep = np.argsort(-lam, kind="stable")[:rank]
            reused = dataclasses.replace(
                eigsh,
                eigenvalues=jnp.asarray(lam[keep]),
                eigenvectors=take(eigsh.eigenvectors, keep),
                residuals=jnp.asarray(np.asarray(eigsh.residuals)[keep]),
                converged=jnp.asarray(np.asarray(eigsh.converged)[keep]),
                thresholds=jnp.asarray(np.asarray(eigsh.thresholds)[keep]),
            )
    try:
        r = _influence(
            op,
            test,
            train,
            method=method,
            damping=damping,
            rank=rank,
            key=key,
            chunk_size=chunk_size,
            with_self_influence=True,
            eigsh=reused,
            # with "solve" the self-influence by Arnoldi (one solve per training example is too
            # many), in the same pass over the training gradients as the scores
            **(
                {  # type: ignore[arg-type]
                    "solver": "cg",
                    "rtol": SOLVE_RTOL[bool(op.dtype == jnp.float64)],
                    "self_influence_method": "arnoldi",
                }
                if method == "solve"
                else {}
            ),
        )
    except ValueError as e:
        raise AnalysisError(
            f"The influence section failed: {e} (--influence-damping, --influence-method, "
            "--influence-rank)"
        ) from None
    scores = np.array(r.scores, np.float64)
    self_inf = np.asarray(r.self_influence, np.float64)
    if excluded:
        for t, i in enumerate(test_idx):
            scores[t, i] = np.nan  # its own score: minus its self-influence
    top = min(top, n_train - (1 if excluded else 0))
    helpful = np.argsort(np.where(np.isnan(scores), np.inf, scores), axis=1, kind="stable")[:, :top]
    harmful = np.argsort(np.where(np.isnan(scores), np.inf, -scores), axis=1, kind="stable")[
        :, :top
    ]
    self_top = np.argsort(-self_inf, kind="stable")[:top]
    f = batch_loss(op)
    test_loss = np.asarray(
        jax.vmap(lambda ex: f(op.params, tu.map(lambda a: a[None], ex)))(test), np.float64
    )
    labels = _labels(train)
    if excluded:
        test_labels = _sel(labels, test_idx)
    else:
        test_labels = _sel(_labels(test_batch_for_labels), test_idx_in_batch)
    shape = image_shape(train, data_spec)
    test_images = images = None
    if shape is not None and int(np.prod(shape)) <= MAX_IMAGE_SIZE:
        test_images = _pixels(test, range(num_test), shape)
        listed = sorted(
            {int(i) for i in np.concatenate([helpful.ravel(), harmful.ravel(), self_top])}
        )
        images = dict(zip(map(str, listed), _pixels(train, listed, shape)))
    return InfluenceSection(
        method=method,
        method_rule=method_rule,
        operator=op.kind,
        damping=float(damping),
        damping_rule=damping_rule,
        rank=r.rank,
        self_influence_method="dense" if method == "dense" else f"arnoldi (rank {rank})",
        eigenpairs=(
            None
            if method == "dense"
            else "the report's top eigenpairs"
            if reused is not None
            else "hvp.eigsh (own key)"
        ),
        converged=bool(r.converged),
        num_matvecs=int(r.num_matvecs),
        num_gradients=int(r.num_gradients),
        seconds=time.perf_counter() - t0,
        num_train=n_train,
        top=int(top),
        test_source=source,
        test_indices=test_idx,
        test_labels=test_labels,
        test_loss=test_loss,
        self_excluded=excluded,
        helpful_indices=helpful,
        helpful_scores=np.take_along_axis(scores, helpful, axis=1),
        helpful_labels=None if labels is None else [_sel(labels, row) for row in helpful],
        harmful_indices=harmful,
        harmful_scores=np.take_along_axis(scores, harmful, axis=1),
        harmful_labels=None if labels is None else [_sel(labels, row) for row in harmful],
        self_influence_indices=[int(i) for i in self_top],
        self_influence_values=self_inf[self_top],
        self_influence_labels=_sel(labels, self_top),
        self_influence_mean=float(np.mean(self_inf)),
        image_shape=shape,
        test_images=test_images,
        images=images,
    )


# ------------------------------------------------------------------------------------------------
# terminal table and figure
# ------------------------------------------------------------------------------------------------
def _get(report, name):
    return report.get(name) if isinstance(report, dict) else getattr(report, name, None)


def _section(report) -> dict | None:
    s = _get(report, "influence")
    if s is None:
        return None
    return s if isinstance(s, dict) else s.to_dict()


def _entry(idx, score, label) -> str:
    lab = "" if label is None else f" ({label})"
    return f"#{idx}{lab} {score:.3g}"


def influence_table(report):
    """A ``rich.table.Table`` of the section (one row per test example), or ``None`` without it.

    Examples:
      >>> from hvp.analysis._influence_section import influence_table
      >>> influence_table({"influence": None}) is None
      True
    """
    from rich.table import Table

    c = _section(report)
    if c is None:
        return None
    t = Table(
        title=(
            f"Influence (Koh & Liang): {_describe(c)}, damping {c['damping']:.3g} "
            f"({c['damping_rule']}); scores < 0 helpful, > 0 harmful"
        ),
        title_justify="left",
    )
    for col in ("test", "loss", f"most helpful (top {c['top']})", "most harmful"):
        t.add_column(col)

    def lab(key, t_, j):
        v = c[key]
        return None if v is None else v[t_][j]

    for t_, idx in enumerate(c["test_indices"]):
        label = "" if c["test_labels"] is None else f" ({c['test_labels'][t_]})"
        t.add_row(
            f"#{idx}{label}",
            f"{c['test_loss'][t_]:.3g}",
            ", ".join(
                _entry(i, s, lab("helpful_labels", t_, j))
                for j, (i, s) in enumerate(zip(c["helpful_indices"][t_], c["helpful_scores"][t_]))
            ),
            ", ".join(
                _entry(i, s, lab("harmful_labels", t_, j))
                for j, (i, s) in enumerate(zip(c["harmful_indices"][t_], c["harmful_scores"][t_]))
            ),
        )
    labels = c["self_influence_labels"]
    self_list = ", ".join(
        _entry(i, v, None if labels is None else labels[j])
        for j, (i, v) in enumerate(zip(c["self_influence_indices"], c["self_influence_values"]))
    )
    conv = "" if c["converged"] else " [red](inverse NOT converged)"
    t.caption = (
        f"test examples: {c['test_source']}. Largest self-influence (outliers / mislabelled?): "
        f"{self_list} (mean {c['self_influence_mean']:.3g}). {c['num_matvecs']} products, "
        f"{c['num_gradients']} per-example gradients, {c['seconds']:.1f} s{conv}"
    )
    return t


def plot_influence(report, path):
    """``influence.png``: the test examples and their most helpful / harmful training examples.

    Image-like inputs (the section's ``image_shape``): one row per test example (the test image,
    then the most helpful training images in green and the most harmful in red, each titled with
    its label and score) and a last row with the training images of largest self-influence.
    Other inputs: bar charts of the same scores and self-influences, one panel per test example.
    Written atomically; ``report`` is an :class:`~hvp.analysis.AnalysisReport` or its dict.

    Examples:
      >>> import os, tempfile
      >>> from hvp.analysis._influence_section import plot_influence
      >>> sec = {"method": "dense", "operator": "hessian", "damping": 0.0, "top": 1,
      ...        "test_indices": [4], "test_labels": None, "test_loss": [0.5],
      ...        "helpful_indices": [[0]], "helpful_scores": [[-1.0]], "helpful_labels": None,
      ...        "harmful_indices": [[2]], "harmful_scores": [[0.3]], "harmful_labels": None,
      ...        "self_influence_indices": [3], "self_influence_values": [2.0],
      ...        "self_influence_labels": None, "image_shape": None, "images": None, "test_images": None}
      >>> path = os.path.join(tempfile.mkdtemp(), "influence.png")
      >>> os.path.basename(plot_influence({"influence": sec}, path))
      'influence.png'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    c = _section(report)
    if c.get("image_shape") and c.get("images") and c.get("test_images") is not None:
        fig = _image_grid(plt, c)
    else:
        fig = _bars(plt, c)
    try:
        atomic_savefig(fig, path)
    finally:
        plt.close(fig)
    return path


def _describe(c) -> str:
    """The method in words: the scores' inverse, and the self-influence's when it differs."""
    names = {"dense": "dense", "solve": "CG", "arnoldi": "Arnoldi"}
    what = f"{names.get(c['method'], c['method'])} inverse of the {c['operator']}"
    if c["method"] == "arnoldi" and c.get("rank") is not None:
        what += f" (rank {c['rank']})"
    self_method = c.get("self_influence_method")
    if c["method"] == "solve" and self_method:
        what += f"; self-influence: {self_method}"
    return what


def _title(c) -> str:
    return f"Influence ({_describe(c)}, damping {c['damping']:.2g}): score < 0 helpful, > 0 harmful"


def _lab(c, key, t, j):
    v = c.get(key)
    if v is None:
        return ""
    return str(v[t][j] if t is not None else v[j])


def _image_grid(plt, c):
    shape = tuple(c["image_shape"])
    shown = min(int(c["top"]), 4)
    n_test = len(c["test_indices"])
    cols = 1 + 2 * shown
    fig, axes = plt.subplots(
        n_test + 1, cols, figsize=(1.15 * cols, 1.35 * (n_test + 1)), squeeze=False
    )

    def draw(ax, pixels, title, color):
        img = np.asarray(pixels, float).reshape(shape)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None)
        ax.set_title(title, fontsize=7, color=color)
        ax.set_xticks([])
        ax.set_yticks([])

    for t in range(n_test):
        lab = "" if c["test_labels"] is None else f": {c['test_labels'][t]}"
        draw(axes[t, 0], c["test_images"][t], f"test #{c['test_indices'][t]}{lab}", "black")
        for j in range(shown):
            for k, (kind, color) in enumerate((("helpful", "tab:green"), ("harmful", "tab:red"))):
                i = c[f"{kind}_indices"][t][j]
                lab = _lab(c, f"{kind}_labels", t, j)
                score = c[f"{kind}_scores"][t][j]
                draw(
                    axes[t, 1 + k * shown + j],
                    c["images"][str(i)],
                    f"#{i}{': ' + lab if lab else ''} ({score:.2g})",
                    color,
                )
    axes[n_test, 0].axis("off")
    axes[n_test, 0].text(0.5, 0.5, "largest\nself-influence", ha="center", va="center", fontsize=7)
    for j in range(cols - 1):
        ax = axes[n_test, 1 + j]
        if j < len(c["self_influence_indices"]):
            i = c["self_influence_indices"][j]
            lab = _lab(c, "self_influence_labels", None, j)
            draw(
                ax,
                c["images"][str(i)],
                f"#{i}{': ' + lab if lab else ''} ({c['self_influence_values'][j]:.2g})",
                "tab:purple",
            )
        else:
            ax.axis("off")
    fig.suptitle(
        f"{_title(c)}\ntest | {shown} most helpful (green) | {shown} most harmful (red)", fontsize=8
    )
    fig.tight_layout()
    return fig


def _tick(i, lab) -> str:
    return f"#{i} (label {lab})" if lab else f"#{i}"


def _bars(plt, c):
    n_test = len(c["test_indices"])
    fig, axes = plt.subplots(1, n_test + 1, figsize=(3.2 * (n_test + 1), 3.4), squeeze=False)
    for t in range(n_test):
        ax = axes[0, t]
        idx = list(c["helpful_indices"][t]) + list(c["harmful_indices"][t])[::-1]
        val = list(c["helpful_scores"][t]) + list(c["harmful_scores"][t])[::-1]
        labs = [_lab(c, "helpful_labels", t, j) for j in range(len(c["helpful_indices"][t]))] + [
            _lab(c, "harmful_labels", t, j) for j in range(len(c["harmful_indices"][t]))
        ][::-1]
        y = np.arange(len(val))
        ax.barh(y, val, color=["tab:green" if v < 0 else "tab:red" for v in val])
        ax.set_yticks(y, [_tick(i, lab) for i, lab in zip(idx, labs)], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="0.3", lw=0.6)
        lab = "" if c["test_labels"] is None else f" ({c['test_labels'][t]})"
        ax.set_title(f"test #{c['test_indices'][t]}{lab}", fontsize=8)
        ax.set_xlabel("influence score", fontsize=7)
    ax = axes[0, n_test]
    vals = c["self_influence_values"]
    y = np.arange(len(vals))
    ax.barh(y, vals, color="tab:purple")
    ax.set_yticks(
        y,
        [
            _tick(i, _lab(c, "self_influence_labels", None, j))
            for j, i in enumerate(c["self_influence_indices"])
        ],
        fontsize=7,
    )
    ax.invert_yaxis()
    ax.set_title("largest self-influence", fontsize=8)
    fig.suptitle(_title(c), fontsize=8)
    fig.tight_layout()
    return fig
