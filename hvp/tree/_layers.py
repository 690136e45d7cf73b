r"""Layers of a parameter pytree: grouping leaves by module path, per-layer shares, short labels.

Framework-free (any pytree, Flax or not): a *layer* is a group of parameter leaves sharing a
module path, found from the ``a/b/kernel`` path strings of :func:`hvp.tree.leaf_paths` alone
(the path minus its last component: ``Dense_0/kernel`` and ``Dense_0/bias`` form layer
``Dense_0``; ``layers/0/kernel`` is in ``layers/0``).

Deep models have long module paths (``decoder/encoderdecoderblock_7/SelfAttention_0/query``);
:func:`layer_labels` gives every layer a short unique label (``block_7/attn/query``) and the
block it belongs to, for tables and plots. The per-layer trace of a curvature operator, which
runs an estimator, is :func:`hvp.linalg.layer_trace`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np

from hvp.tree._tree import leading_dim, leaf_paths

__all__ = [
    "layer_of",
    "group_by_layer",
    "layer_norms",
    "LayerLabels",
    "layer_labels",
]


def layer_of(path: str) -> str:
    """The layer name of a leaf path: the path minus its last component (``a/b/kernel`` -> ``a/b``).

    A top-level leaf (no ``/``) is its own layer.

    Examples:
        >>> from hvp.tree import layer_of
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
        >>> hvp.tree.group_by_layer(params)
        {'dense': ['dense/bias', 'dense/kernel'], 'out': ['out/kernel']}
    """
    groups: dict[str, list[str]] = {}
    for path in leaf_paths(tree):
        groups.setdefault(layer_fn(path), []).append(path)
    return groups


def _leaf_layer_index(tree, layer_fn) -> tuple[list[str], list[int]]:
    groups = group_by_layer(tree, layer_fn=layer_fn)
    names = list(groups)
    where = {p: i for i, name in enumerate(names) for p in groups[name]}
    return names, [where[p] for p in leaf_paths(tree)]


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
        >>> {k: v.round(4) for k, v in hvp.tree.layer_norms(vecs).items()}  # one row per eigenvector
        {'dense': array([1.]), 'out': array([1.])}
    """
    block = getattr(eigenvectors, "eigenvectors", eigenvectors)
    leaves = jax.tree_util.tree_leaves(block)
    if not leaves:
        raise ValueError("`eigenvectors` has no array leaves.")
    try:
        k = leading_dim(block)
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
      >>> from hvp.tree import layer_labels
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
      >>> from hvp.tree import layer_labels
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
