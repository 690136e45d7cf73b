r"""Per-layer views of curvature: eigenvector mass and trace by layer.

Model-agnostic: a *layer* is a group of parameter leaves sharing a module
path, found from the ``a/b/kernel`` path strings of :func:`hvp.tree.leaf_paths`
alone (the path minus its last component: ``Dense_0/kernel`` and
``Dense_0/bias`` form layer ``Dense_0``; ``layers/0/kernel`` is in
``layers/0``). Works for any parameter pytree, Flax or not.

Deep models have long module paths (``decoder/encoderdecoderblock_7/SelfAttention_0/query``);
:func:`layer_labels` gives every layer a short unique label (``block_7/attn/query``) and the
block it belongs to, for tables and plots, and :meth:`LayerTrace.grouped` sums per-layer traces
into blocks with honest standard errors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from hvp import tree as tu
from hvp.linalg import diagonal
from hvp.operators import as_operator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = [
    "layer_of",
    "group_by_layer",
    "layer_norms",
    "layer_trace",
    "LayerTrace",
    "LayerLabels",
    "layer_labels",
]


def layer_of(path: str) -> str:
    """The layer name of a leaf path: the path minus its last component (``a/b/kernel`` -> ``a/b``).

    A top-level leaf (no ``/``) is its own layer.

    Examples:
        >>> from hvp.flax import layer_of
        >>> layer_of("encoder/dense/kernel"), layer_of("scale")
        ('encoder/dense', 'scale')
    """
    head, sep, _ = path.rpartition("/")
    return head if sep else path


def group_by_layer(tree, *, layer_fn: Callable[[str], str] = layer_of) -> dict[str, list[str]]:
    """Group the leaves of ``tree`` by layer: ``{layer: [leaf paths]}``.

    Layers and paths appear in ``tree_leaves`` order. ``layer_fn`` maps a leaf
    path to its layer name (default :func:`layer_of`); pass e.g.
    ``lambda p: p.split("/")[0]`` to group by top-level module instead.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> params = {"dense": {"bias": jnp.zeros(1), "kernel": jnp.zeros(2)}, "out": {"kernel": jnp.zeros(1)}}
        >>> hvp.flax.group_by_layer(params)
        {'dense': ['dense/bias', 'dense/kernel'], 'out': ['out/kernel']}
    """
    groups: dict[str, list[str]] = {}
    for path in tu.leaf_paths(tree):
        groups.setdefault(layer_fn(path), []).append(path)
    return groups


def _leaf_layer_index(tree, layer_fn) -> tuple[list[str], list[int]]:
    groups = group_by_layer(tree, layer_fn=layer_fn)
    names = list(groups)
    where = {p: i for i, name in enumerate(names) for p in groups[name]}
    return names, [where[p] for p in tu.leaf_paths(tree)]


def layer_norms(
    eigenvectors, *, layer_fn: Callable[[str], str] = layer_of
) -> dict[str, np.ndarray]:
    r"""Share of each vector's squared norm that lies in each layer.

    For vectors :math:`v_j` (rows of a stacked block) and layers :math:`l`,

    .. math:: s_{l j} = \frac{\lVert v_{j,l} \rVert^2}{\lVert v_j \rVert^2},
              \qquad \sum_l s_{l j} = 1,

    which shows where the top curvature directions live (e.g. sharpness
    concentrated in the last layer).

    Args:
      eigenvectors: a stacked block of vectors (params-shaped pytree with a
        leading axis ``k``), or a result with an ``eigenvectors`` field (from
        :func:`hvp.eigsh`).
      layer_fn: leaf path -> layer name (default :func:`layer_of`).

    Returns:
      ``{layer: array of shape (k,)}`` in parameter order.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> params = {"dense": {"bias": jnp.zeros(1), "kernel": jnp.zeros(2)}, "out": {"kernel": jnp.zeros(1)}}
        >>> vecs = {"dense": {"bias": jnp.array([[1.0]]), "kernel": jnp.array([[0.0, 0.0]])}, "out": {"kernel": jnp.array([[1.0]])}}
        >>> {k: v.round(4) for k, v in hvp.flax.layer_norms(vecs).items()}  # one row per eigenvector
        {'dense': array([1.]), 'out': array([1.])}
    """
    block = getattr(eigenvectors, "eigenvectors", eigenvectors)
    leaves = jax.tree_util.tree_leaves(block)
    if not leaves:
        raise ValueError("`eigenvectors` has no array leaves.")
    try:
        k = tu.leading_dim(block)
    except ValueError as err:
        raise ValueError(
            f"`eigenvectors` must be a stacked block (leading axis k on every leaf): {err} "
            "For a single vector pass `hvp.tree.map(lambda x: x[None], v)`."
        ) from None
    names, index = _leaf_layer_index(block, layer_fn)
    sq = np.zeros((len(names), k))
    for x, i in zip(leaves, index):
        a = np.asarray(x, dtype=np.float64).reshape(k, -1)
        sq[i] += np.sum(a * a, axis=1)
    total = sq.sum(axis=0)
    if np.any(total == 0):
        raise ValueError("A vector in `eigenvectors` is zero; its layer shares are undefined.")
    shares = sq / total
    return {name: shares[i] for i, name in enumerate(names)}


@tu.result(static=("layers", "method"))
class LayerTrace:
    r"""Per-layer traces :math:`\operatorname{tr}(A_{ll})` of the diagonal blocks of an operator.

    Attributes:
      layers: layer names (tuple of str), in parameter order.
      estimate: shape ``(num_layers,)``; sums to the trace estimate of ``A``.
      std_error: shape ``(num_layers,)``; zero for ``method="exact"``.
      total: the sum of ``estimate`` (an estimate of ``tr A``).
      total_std_error: its standard error (from the per-probe totals).
      num_matvecs: products with ``A`` used.
      method: ``"hutchinson"`` or ``"exact"``.
      samples: per-probe layer sums :math:`z_{i,l}^\top (A z_i)_l`, shape ``(m, num_layers)``
        (per basis vector for ``"exact"``), from which :meth:`grouped` gets honest standard
        errors of sums of layers; ``None`` when not kept.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> from hvp.flax import layer_trace
      >>> params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(3)}}
      >>> lt = layer_trace(hvp.from_dense(jnp.diag(jnp.arange(1.0, 6.0)), like=params), method="exact")
      >>> lt.layers, lt.estimate.round(4).tolist(), round(float(lt.total), 4)  # 1 + 2, 3 + 4 + 5
      (('a', 'b'), [3.0, 12.0], 15.0)
    """

    layers: tuple
    estimate: Any
    std_error: Any
    total: Any
    total_std_error: Any
    num_matvecs: Any
    method: str
    samples: Any = None

    def grouped(self, group: Callable[[str], str] | dict) -> LayerTrace:
        r"""Sum layers into groups (e.g. blocks): traces add, standard errors come from the probes.

        The layers of a group share the probes, so their errors are correlated; the group's
        standard error is that of the per-probe group sums (sample standard deviation over
        :math:`\sqrt m`), not a sum in quadrature.

        Args:
          group: layer name -> group name, a callable or a dict (e.g.
            ``dict(zip(labels.layers, labels.block))`` from :func:`layer_labels`).

        Returns:
          A :class:`LayerTrace` whose ``layers`` are the groups in order of first appearance
          (``total``, ``total_std_error`` and ``num_matvecs`` unchanged).

        Raises:
          ValueError: if the per-probe ``samples`` were not kept.

        Example:
          >>> import jax, jax.numpy as jnp, hvp
          >>> from hvp.flax import layer_trace
          >>> params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(3)}}
          >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 6.0)), like=params)
          >>> lt = layer_trace(op, method="exact")
          >>> [float(x) for x in lt.grouped(lambda name: "all").estimate]
          [15.0]
        """
        if self.samples is None:
            raise ValueError(
                "This LayerTrace has no per-probe `samples`; compute it with hvp.flax.layer_trace."
            )
        fn = group.__getitem__ if isinstance(group, dict) else group
        names = list(dict.fromkeys(fn(n) for n in self.layers))
        where = {g: i for i, g in enumerate(names)}
        samples = np.asarray(self.samples, dtype=np.float64)
        summed = np.zeros((samples.shape[0], len(names)))
        for j, layer in enumerate(self.layers):
            summed[:, where[fn(layer)]] += samples[:, j]
        est, se = _mean_se_np(summed, exact=self.method == "exact")
        return dataclasses.replace(
            self, layers=tuple(names), estimate=est, std_error=se, samples=summed
        )

    def as_dict(self) -> dict[str, tuple[float, float]]:
        """``{layer: (estimate, std_error)}``."""
        return {
            n: (float(e), float(s))
            for n, e, s in zip(self.layers, np.asarray(self.estimate), np.asarray(self.std_error))
        }

    def fractions(self) -> dict[str, float]:
        """``{layer: estimate / total}``: each layer's share of the trace."""
        total = float(self.total)
        return {n: float(e) / total for n, e in zip(self.layers, np.asarray(self.estimate))}


def layer_trace(
    op: OperatorLike,
    *,
    key: PRNGKey | None = None,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    chunk_size: int | None = None,
    layer_fn: Callable[[str], str] = layer_of,
    like: PyTree | None = None,
) -> LayerTrace:
    r"""Trace of each layer's diagonal block of a curvature operator, with standard errors.

    ``method="hutchinson"`` (Hutchinson, 1989) draws Rademacher probes
    :math:`z_1, \dots, z_m` and, for each layer :math:`l` (its coordinates
    :math:`z_l`), averages :math:`z_{i,l}^\top (A z_i)_l`, an unbiased
    estimate of :math:`\operatorname{tr} A_{ll} = \sum_{j \in l} A_{jj}` (the
    block-restricted diagonal estimator of Bekas, Kokiopoulou & Saad, 2007).
    Standard errors are the sample standard deviations across probes over
    :math:`\sqrt m`; the per-probe totals give an honest standard error of the
    full trace. ``method="exact"`` applies ``A`` to every basis vector
    (``n`` products; small models and validation only).

    Computed with :func:`hvp.linalg.diagonal` (per-probe leaf sums grouped by
    layer), ``chunk_size`` probes per compiled, vmapped call.

    Args:
      op: a :class:`~hvp.LinearOperator` (e.g. ``problem.hessian(data)``), or a
        matvec callable with ``like=``.
      key: PRNG key (required for ``"hutchinson"``).
      num_matvecs: number of probes ``m`` (``"hutchinson"``).
      method: ``"hutchinson"`` or ``"exact"``.
      chunk_size: probes (or basis vectors) per compiled call; default all at
        once for Hutchinson, 256 for exact. Peak memory is about
        ``2 * chunk_size`` parameter copies plus the operator's own.
      layer_fn: leaf path -> layer name (default :func:`layer_of`).
      like: the parameter pytree, when ``op`` is a matvec callable.

    Returns:
      A :class:`LayerTrace` (with the per-probe layer sums in ``samples``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.flax import layer_trace
      >>> params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(3)}}
      >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 6.0)), like=params)
      >>> lt = layer_trace(op, key=jax.random.key(0), num_matvecs=4)  # exact for a diagonal A
      >>> lt.method, lt.estimate.round(4).tolist(), lt.std_error.round(4).tolist()
      ('hutchinson', [3.0, 12.0], [0.0, 0.0])
    """
    op = as_operator(op, like)
    names, _ = _leaf_layer_index(op.like, layer_fn)
    n = op.size
    if method == "hutchinson":
        if key is None:
            raise ValueError(
                "layer_trace(method='hutchinson') needs a PRNG key: pass `key=jax.random.key(0)`."
            )
        if not isinstance(num_matvecs, (int, np.integer)) or num_matvecs < 2:
            raise ValueError(
                f"`num_matvecs` must be an integer >= 2 (for a standard error), got {num_matvecs!r}."
            )
        m = int(num_matvecs)
    elif method == "exact":
        key, m = (jax.random.PRNGKey(0) if key is None else key), n
    else:
        raise ValueError(f"Unknown method {method!r}; use 'hutchinson' or 'exact'.")
    # One estimator for diagonals and block traces: hvp.linalg.diagonal keeps the per-probe leaf
    # sums, so grouping leaves into layers gives honest standard errors (and is exact for m >= n).
    diag = diagonal(op, key=key, num_matvecs=m, chunk_size=chunk_size)
    by_layer = diag.sum_by(layer_fn)
    total = diag.trace()
    est = np.array([float(by_layer.estimate[k]) for k in names])
    se = np.array([float(by_layer.std_error[k]) for k in names])
    where = {name: i for i, name in enumerate(names)}
    leaf_samples = jax.tree_util.tree_leaves(diag.leaf_samples)
    samples = np.zeros((np.shape(leaf_samples[0])[0], len(names)))
    for path, s in zip(tu.leaf_paths(diag.leaf_samples), leaf_samples):
        samples[:, where[layer_fn(path)]] += np.asarray(s, dtype=np.float64)
    return LayerTrace(
        layers=tuple(names),
        estimate=est,
        std_error=se,
        total=float(total.estimate),
        total_std_error=float(total.std_error),
        num_matvecs=int(diag.num_matvecs),
        method="exact" if diag.method == "exact" else "hutchinson",
        samples=samples,
    )


def _mean_se_np(samples: np.ndarray, *, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """Column estimates and standard errors of per-probe sums (as :func:`hvp.linalg.diagonal`)."""
    m = samples.shape[0]
    if exact:
        return samples.sum(axis=0), np.zeros(samples.shape[1])
    if m < 2:
        return samples.mean(axis=0), np.full(samples.shape[1], np.inf)
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(m)


# ------------------------------------------------------------------------------------------------
# short, unique layer labels and blocks
# ------------------------------------------------------------------------------------------------
#: (pattern on a module's lower-cased name without its ``_<index>`` suffix, short name); the first
#: match wins, so ``MlpBlock`` is ``mlp`` and ``encoderdecoderblock`` is ``block``.
_ALIASES = (
    (re.compile(r"attention|^attn$|^mha$"), "attn"),
    (re.compile(r"mlp"), "mlp"),
    (re.compile(r"^layer_?norm$|^ln$"), "ln"),
    (re.compile(r"^rms_?norm$"), "rms"),
    (re.compile(r"^batch_?norm$|^bn$"), "bn"),
    (re.compile(r"^group_?norm$"), "gn"),
    (re.compile(r"block|^layers?$"), "block"),
    (re.compile(r"^embed(ding)?$"), "embed"),
    (re.compile(r"^dense(general)?$|^linear$"), "dense"),
    (re.compile(r"^conv$"), "conv"),
)
_INDEXED = re.compile(r"(.+?)_(\d+)")


@dataclasses.dataclass(frozen=True)
class LayerLabels:
    """Short unique labels of layers, and the block each layer belongs to (see :func:`layer_labels`).

    Attributes:
      layers: the layer names given (tuple of str), in the order given.
      short: a short label per layer, unique (``block_7/attn/query``).
      block: the block of each layer (``block_7``; a layer outside any repeated block is its own
        block, named by its first label component, e.g. ``embed``).
      kind: the rest of the short label inside its block (``attn/query``; ``""`` for a layer that is
        the block itself): the same kind in every block of a stack, for heat maps.

    Examples:
      >>> from hvp.flax import layer_labels
      >>> names = [f"decoder/encoderdecoderblock_{i}/SelfAttention_0/query" for i in range(2)]
      >>> lab = layer_labels(names + ["decoder/Embed_0"])
      >>> lab.block, lab.kind
      (('block_0', 'block_1', 'embed'), ('attn/query', 'attn/query', ''))
    """

    layers: tuple
    short: tuple
    block: tuple
    kind: tuple

    def as_dict(self) -> dict[str, str]:
        """``{layer: short label}``."""
        return dict(zip(self.layers, self.short))

    def blocks(self) -> tuple:
        """The distinct blocks, in order of first appearance."""
        return tuple(dict.fromkeys(self.block))


def _split(name: str) -> list[str]:
    """Path components, with a list index fused to its container: ``blocks/0/attn`` -> ``blocks_0/attn``."""
    out: list[str] = []
    for comp in name.split("/"):
        if comp.isdigit() and out:
            out[-1] = f"{out[-1]}_{comp}"
        else:
            out.append(comp)
    return out


def _parse(comp: str) -> tuple[str, str | None, str | None]:
    """``(base, index, alias)`` of a component: ``SelfAttention_0`` -> ``("SelfAttention", "0", "attn")``."""
    m = _INDEXED.fullmatch(comp)
    base, idx = (m.group(1), m.group(2)) if m else (comp, None)
    low = base.lower()
    alias = next((short for pat, short in _ALIASES if pat.search(low)), None)
    return base, idx, alias


def _family(comp: str) -> str:
    base, _, alias = _parse(comp)
    return alias or base


def _sibling_labels(comps: set[str]) -> dict[str, str]:
    """Short labels of the distinct components under one parent, unique among them."""
    parsed = {c: _parse(c) for c in comps}
    indices: dict[str, set] = {}
    for base, idx, alias in parsed.values():
        indices.setdefault(alias or base, set()).add(idx)
    label = {}
    for c, (_, idx, alias) in parsed.items():
        if alias is None:
            label[c] = c
        elif idx is None or (indices[alias] == {"0"}):
            # the only one of its kind here: no index (``SelfAttention_0`` -> ``attn``)
            label[c] = alias
        else:
            label[c] = f"{alias}_{idx}"
    seen: dict[str, list[str]] = {}
    for c, lab in label.items():
        seen.setdefault(lab, []).append(c)
    for cs in seen.values():
        # two modules would share a label (SelfAttention_0, CrossAttention_0): keep their names
        if len(cs) > 1:
            for c in cs:
                label[c] = c
    return label


def layer_labels(layers: Sequence[str]) -> LayerLabels:
    """Short unique labels and blocks for layer names (module paths such as :func:`layer_of` gives).

    The rule, applied to the set of names (so labels do not depend on their order):

    1. leading path components shared by every layer are elided (``decoder/``, ``params/``);
    2. a list index is fused to its container (``blocks/0`` -> ``blocks_0``);
    3. common module names are shortened (``SelfAttention``/``MultiHeadDotProductAttention`` ->
       ``attn``, ``MlpBlock`` -> ``mlp``, ``*Block``/``layers`` -> ``block``, ``LayerNorm`` -> ``ln``,
       ``BatchNorm`` -> ``bn``, ``Embed`` -> ``embed``, ``Dense`` -> ``dense``, ``Conv`` ->
       ``conv``), keeping the ``_<index>`` suffix unless the module is the only one of its kind
       among its siblings (``SelfAttention_0`` -> ``attn``, but ``Dense_0``, ``Dense_1`` ->
       ``dense_0``, ``dense_1``); other names are kept as written;
    4. where two sibling modules would get the same label, both keep their own names, so labels
       are always unique (distinct names give distinct labels).

    A layer's *block* is its label up to the first component that is one of an indexed family
    with at least two members (``block_0 .. block_11``, ``blocks/0 ..``) and has sub-modules;
    a layer outside such a family is its own block, named by its first component.

    Args:
      layers: distinct layer names (``a/b/c`` strings).

    Returns:
      A :class:`LayerLabels`.

    Raises:
      ValueError: if ``layers`` has duplicates.

    Examples:
      >>> from hvp.flax import layer_labels
      >>> names = [f"decoder/encoderdecoderblock_{i}/SelfAttention_0/query" for i in range(2)]
      >>> lab = layer_labels(names + ["decoder/Embed_0"])
      >>> lab.short
      ('block_0/attn/query', 'block_1/attn/query', 'embed')
      >>> lab.block
      ('block_0', 'block_1', 'embed')
    """
    names = tuple(str(n) for n in layers)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"`layers` has duplicate names: {', '.join(dup[:5])}.")
    parts = [_split(n) for n in names]
    # 1. elide the leading components every layer shares (keep at least one per layer)
    skip = 0
    while parts and all(len(p) > skip + 1 for p in parts) and len({p[skip] for p in parts}) == 1:
        skip += 1
    parts = [p[skip:] for p in parts]
    # 2. label each component among its siblings (same parent path)
    children: dict[tuple, set] = {}
    for p in parts:
        for j, c in enumerate(p):
            children.setdefault(tuple(p[:j]), set()).add(c)
    labels = {parent: _sibling_labels(cs) for parent, cs in children.items()}
    families = {
        parent: {f for f in {_family(c) for c in cs} if sum(_family(c) == f for c in cs) >= 2}
        for parent, cs in children.items()
    }
    short, block, kind = [], [], []
    for p in parts:
        lab = [labels[tuple(p[:j])][c] for j, c in enumerate(p)]
        short.append("/".join(lab))
        cut = next(
            (
                j
                for j, c in enumerate(p[:-1])
                if _INDEXED.fullmatch(c) and _family(c) in families[tuple(p[:j])]
            ),
            0,
        )
        block.append("/".join(lab[: cut + 1]))
        kind.append("/".join(lab[cut + 1 :]))
    if len(set(short)) != len(
        short
    ):  # cannot happen with distinct paths; keep the elided names then
        short = ["/".join(p) for p in parts]
    return LayerLabels(layers=names, short=tuple(short), block=tuple(block), kind=tuple(kind))
