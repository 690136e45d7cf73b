"""Readable per-layer reports for deep models (issue 16 §2): short unique labels, blocks, the
terminal table at 80 columns, grouped standard errors from the probes, and ``layers.png``.

Parameter trees named as the Flax lm1b example's Linen TransformerLM (12 blocks) and as an NNX
GPT-style model; reports are synthetic dicts (the layout of ``report.json``), so no analysis runs
here (``tests/cli/test_cli_analyze.py`` runs the whole pipeline).
"""

from __future__ import annotations

import io
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console

import hvp
from hvp import tree as tu
from hvp.analysis._layer_report import (
    MAX_BARS,
    block_groups,
    layer_figure,
    layer_rows,
    layer_table,
    plot_layers,
)
from hvp.linalg import diagonal, layer_trace
from hvp.tree import group_by_layer, layer_labels

BLOCK = {
    "LayerNorm_0": ("scale", "bias"),
    "SelfAttention_0/query": ("kernel", "bias"),
    "SelfAttention_0/key": ("kernel", "bias"),
    "SelfAttention_0/value": ("kernel", "bias"),
    "SelfAttention_0/out": ("kernel", "bias"),
    "LayerNorm_1": ("scale", "bias"),
    "MlpBlock_0/Dense_0": ("kernel", "bias"),
    "MlpBlock_0/Dense_1": ("kernel", "bias"),
}


def _nest(paths):
    tree: dict = {}
    for p in paths:
        *head, leaf = p.split("/")
        d = tree
        for h in head:
            d = d.setdefault(h, {})
        d[leaf] = np.zeros((2,), np.float32)
    return tree


def lm1b_params(num_blocks=12):
    """Paths of the lm1b example's TransformerLM (Linen): ``decoder/encoderdecoderblock_{i}/...``."""
    paths = ["decoder/Embed_0/embedding"]
    for i in range(num_blocks):
        for mod, leaves in BLOCK.items():
            paths += [f"decoder/encoderdecoderblock_{i}/{mod}/{leaf}" for leaf in leaves]
    paths += ["decoder/encoderdecoder_norm/scale", "decoder/encoderdecoder_norm/bias"]
    paths += ["decoder/logitdense/kernel", "decoder/logitdense/bias"]
    return {"params": _nest(paths)}


def gpt_nnx_params(num_blocks=12):
    """A real NNX GPT-style model (``blocks`` an ``nnx.List``), tiny, as ``hvp.flax.nnx_params``."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, d, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=1, in_features=d, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc = nnx.Linear(d, 2 * d, rngs=rngs)
            self.proj = nnx.Linear(2 * d, d, rngs=rngs)

    class GPT(nnx.Module):
        def __init__(self, rngs, d=2, vocab=3):
            self.wte = nnx.Embed(vocab, d, rngs=rngs)
            self.blocks = nnx.List([Block(d, rngs) for _ in range(num_blocks)])
            self.ln_f = nnx.LayerNorm(d, rngs=rngs)
            self.lm_head = nnx.Linear(d, vocab, rngs=rngs)

    return hvp.flax.nnx_params(GPT(nnx.Rngs(0)))


def _report(names, seed=0):
    rng = np.random.default_rng(seed)
    n = len(names)
    tr = rng.gamma(1.0, 1.0, n) * rng.choice([1.0, 1.0, 1.0, -1.0], n)
    return {
        "layers": {
            "layers": list(names),
            "num_params": [int(x) for x in rng.integers(10, 10**6, n)],
            "trace": tr.tolist(),
            "trace_std_error": (0.1 * np.abs(tr)).tolist(),
            "top_eigenvector_mass": rng.dirichlet(np.ones(n)).tolist(),
        },
        "trace": {"estimate": float(tr.sum())},
        "model": {"operator": "hessian", "spec": "lm1b-style"},
    }


def test_lm1b_labels_short_unique_stable():
    layers = list(group_by_layer(lm1b_params()))
    assert len(layers) == 12 * 8 + 3
    lab = layer_labels(layers)
    m = lab.as_dict()
    assert len(set(lab.short)) == len(layers)  # unique
    assert max(len(s) for s in lab.short) <= 22  # short (the full names are up to 53)
    assert m["params/decoder/encoderdecoderblock_7/SelfAttention_0/query"] == "block_7/attn/query"
    assert m["params/decoder/encoderdecoderblock_11/MlpBlock_0/Dense_1"] == "block_11/mlp/dense_1"
    assert m["params/decoder/encoderdecoderblock_0/LayerNorm_1"] == "block_0/ln_1"
    assert m["params/decoder/Embed_0"] == "embed"
    assert m["params/decoder/logitdense"] == "logitdense"
    # blocks: the 12 transformer blocks and one for each layer outside them
    assert set(lab.blocks()) == {f"block_{i}" for i in range(12)} | {
        "embed",
        "encoderdecoder_norm",
        "logitdense",
    }
    kinds = {b: sorted(k for k, bb in zip(lab.kind, lab.block) if bb == b) for b in lab.blocks()}
    assert all(kinds[f"block_{i}"] == kinds["block_0"] for i in range(12))
    assert len(kinds["block_0"]) == 8 and kinds["embed"] == [""]
    # stable: the same labels whatever the order of the layers, and on every call
    shuffled = layers[:]
    random.Random(0).shuffle(shuffled)
    assert layer_labels(shuffled).as_dict() == m == layer_labels(layers).as_dict()


def test_nnx_gpt_labels():
    layers = list(group_by_layer(gpt_nnx_params()))
    lab = layer_labels(layers)
    m = lab.as_dict()
    assert len(set(lab.short)) == len(layers) == 12 * 8 + 3
    assert m["blocks/3/attn/query"] == "block_3/attn/query"
    assert m["blocks/11/fc"] == "block_11/fc" and m["wte"] == "wte" and m["lm_head"] == "lm_head"
    assert lab.blocks()[:3] == ("block_0", "block_1", "block_2")
    assert "ln_f" in lab.blocks() and len(lab.blocks()) == 15


def test_labels_keep_names_that_would_collide_and_reject_duplicates():
    lab = layer_labels(["b/SelfAttention_0/q", "b/CrossAttention_0/q", "b/Dense_0", "b/Dense_1"])
    assert lab.short == ("SelfAttention_0/q", "CrossAttention_0/q", "dense_0", "dense_1")
    assert layer_labels(["Dense_0"]).short == ("dense",)
    with pytest.raises(ValueError, match="duplicate"):
        layer_labels(["a/b", "a/b"])


def _render(table, width=80):
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(table)
    return buf.getvalue()


def _row_labels(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split()[0])
    return rows


@pytest.mark.parametrize("view", ["grouped", "all"])
def test_table_readable_at_80_columns(view):
    layers = list(group_by_layer(lm1b_params()))
    rep = _report(layers)
    text = _render(layer_table(rep, view=view, top=10))
    assert all(len(line) <= 80 for line in text.splitlines())
    labels = _row_labels(text)
    rows = layer_rows(rep, view)
    assert len(labels) == 10 and len(set(labels)) == 10
    assert "…" not in text
    # the rows are the 10 largest by |trace|, in that order, with their full labels
    expect = [r["label"] for r in sorted(rows, key=lambda r: -abs(r["trace"]))[:10]]
    assert labels == expect
    more = 15 - 10 if view == "grouped" else 99 - 10
    assert re.search(rf"{more} more (block|layer)s hold", text)
    assert "report.json" in text
    if view == "grouped":  # no per-probe block errors in this report: the bound is marked
        assert "≤" in text and all(r["se_bound"] for r in rows if len(r["layers"]) > 1)


def _dense_op(params, seed=0):
    n = tu.size(params)
    a = np.random.default_rng(seed).normal(size=(n, n))
    return hvp.from_dense(jnp.asarray(a @ a.T / n + np.eye(n)), like=params), a @ a.T / n + np.eye(
        n
    )


def test_grouped_standard_errors_come_from_the_probes():
    params = {
        f"encoderdecoderblock_{i}": {
            "attn": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)},
            "mlp": {"kernel": jnp.zeros((3,))},
        }
        for i in range(3)
    }
    params["head"] = {"kernel": jnp.zeros(4)}
    op, dense = _dense_op(params)
    key = jax.random.PRNGKey(3)
    lt = layer_trace(op, key=key, num_matvecs=12)
    lab = layer_labels(lt.layers)
    assert lab.blocks() == ("block_0", "block_1", "block_2", "head")
    groups = block_groups(lt, lab)
    # the same probes grouped by hvp.linalg.diagonal directly
    block_of = dict(zip(lt.layers, lab.block))
    ref = diagonal(op, key=key, num_matvecs=12).sum_by(lambda p: block_of[p.rsplit("/", 1)[0]])
    for name, est, se in zip(groups["names"], groups["trace"], groups["trace_std_error"]):
        assert est == pytest.approx(float(ref.estimate[name]), rel=1e-10)
        assert se == pytest.approx(float(ref.std_error[name]), rel=1e-10)
    # correlated layers: the honest error differs from the quadrature sum of the layers' errors
    in_block0 = [b == "block_0" for b in lab.block]
    quad = np.sqrt(np.sum(np.asarray(lt.std_error)[in_block0] ** 2))
    assert groups["trace_std_error"][0] != pytest.approx(quad, rel=1e-6)
    # exact: block traces equal the dense float64 block traces
    ex = layer_trace(op, key=jax.random.key(0), method="exact")
    g = ex.grouped(dict(zip(lab.layers, lab.block)))
    flat_index = np.cumsum([0] + [x.size for x in jax.tree_util.tree_leaves(params)])
    diag = np.diag(dense)
    per_leaf = [diag[a:b].sum() for a, b in zip(flat_index[:-1], flat_index[1:])]
    by_block: dict = {}
    for path, t in zip(tu.leaf_paths(params), per_leaf):
        b = lab.block[lab.layers.index(path.rsplit("/", 1)[0])]
        by_block[b] = by_block.get(b, 0.0) + t
    np.testing.assert_allclose(np.asarray(g.estimate), [by_block[b] for b in g.layers], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(g.std_error), 0.0)


def test_grouped_rows_use_the_reports_block_errors():
    layers = list(group_by_layer(lm1b_params(2)))
    rep = _report(layers)
    lab = layer_labels(layers)
    rep["layers"].update(
        labels=list(lab.short),
        block=list(lab.block),
        kind=list(lab.kind),
        groups={"names": list(lab.blocks()), "trace_std_error": [0.5] * len(lab.blocks())},
    )
    rows = layer_rows(rep, "grouped")
    assert [r["label"] for r in rows] == list(lab.blocks())
    assert all(r["std_error"] == 0.5 and not r["se_bound"] for r in rows)
    assert "≤" not in _render(layer_table(rep, view="grouped"))
    tr = np.asarray(rep["layers"]["trace"])
    block0 = next(r for r in rows if r["label"] == "block_0")
    in_block0 = np.array([b == "block_0" for b in lab.block])
    assert in_block0.sum() == 8 and block0["trace"] == pytest.approx(tr[in_block0].sum())


def test_layers_plot_legible_at_100_layers(tmp_path):
    import matplotlib.pyplot as plt

    layers = list(group_by_layer(lm1b_params()))
    rep = _report(layers)
    fig = layer_figure(rep, view="all")
    try:
        bars, _, heat = fig.axes[:3]
        ticks = [t.get_text() for t in bars.get_yticklabels()]
        assert len(ticks) == MAX_BARS and len(set(ticks)) == MAX_BARS
        assert ticks[-1] == f"({99 - MAX_BARS + 1} more)"
        w, h = fig.get_size_inches()
        assert h >= 0.2 * MAX_BARS and h <= 20 and w <= 20  # about 0.24 inch per bar, bounded
        assert [t.get_text() for t in heat.get_yticklabels()] == [f"block_{i}" for i in range(12)]
        assert len(heat.get_xticklabels()) == 8  # layer kinds
    finally:
        plt.close(fig)
    fig = layer_figure(rep, view="grouped")
    try:
        ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert (
            len(ticks) == 15
            and ticks[0] == max(layer_rows(rep, "grouped"), key=lambda r: abs(r["trace"]))["label"]
        )
    finally:
        plt.close(fig)
    path = plot_layers(rep, tmp_path / "layers.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]  # no temporary file left
    with pytest.raises(ValueError, match="grouped, all"):
        layer_table(rep, view="blocks")
