"""The analysis benchmark group (issue 16 §4): Flax-example model shapes and `hvp analyze` stages.

Default run: the models are built as the benchmark builds them (layer names, BatchNorm state,
the lm1b example's padding-masked loss against a NumPy float64 reference) and the plan parser
reads what the progress display prints. Slow: ``python -m benchmarks --quick --only analysis``
end to end (compilation-bound: about 80 s of CPU for the two tiny models, as every stage
compiles its own program; issue 11 owns that).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmark_runs import run_benchmark

from benchmarks import _models as M
from benchmarks.bench_analysis import STAGES, parse_plan
from hvp import tree as tu
from hvp.tree import group_by_layer, layer_labels


def test_lm1b_shape_names_and_masked_loss():
    factory, variables, batches = M.lm1b_like(num_layers=2, vocab=16, emb=8, mlp=16, seq_len=8)
    (model, vars_), loss = factory()
    assert vars_ is variables and set(variables) == {"params"}
    layers = list(group_by_layer(variables["params"]))
    assert "decoder/encoderdecoderblock_1/SelfAttention_0/query" in layers
    lab = layer_labels(layers).as_dict()
    assert lab["decoder/encoderdecoderblock_1/SelfAttention_0/query"] == "block_1/attn/query"
    assert lab["decoder/encoderdecoderblock_0/MlpBlock_0/Dense_1"] == "block_0/mlp/dense_1"
    tokens, targets = batches[0]
    pad = np.asarray(targets) == 0
    assert 0.05 < pad.mean() < 0.5  # padded sequences, as in lm1b
    logits = np.asarray(jax.jit(model.apply)(variables, tokens), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    ref = (nll * ~pad).sum() / (~pad).sum()  # the example's weighted mean over real tokens
    assert float(loss(jnp.asarray(logits, jnp.float32), targets)) == pytest.approx(ref, rel=1e-5)
    assert abs(ref - nll.mean()) > 1e-3  # padding would change it


def test_resnet_bn_shape():
    factory, variables, batches = M.resnet_bn(stage_sizes=(1, 1), filters=4, image=8, batch=4)
    (model, vars_, kwargs), loss = factory()
    assert kwargs == {"train": False} and loss == "cross_entropy"
    assert set(variables) == {"params", "batch_stats"}
    paths = tu.leaf_paths(variables["params"])
    assert "ResNetBlock_1/conv_proj/kernel" in paths and "bn_init/scale" in paths
    # evaluation mode: running statistics, nothing mutable, logits of the right shape
    x, y = batches[0]
    assert jax.eval_shape(lambda v: model.apply(v, x, train=False), variables).shape == (4, 10)
    labels = layer_labels(list(group_by_layer(variables["params"]))).as_dict()
    assert labels["ResNetBlock_1/norm_proj"] == "block_1/norm_proj"


def test_parse_plan():
    text = (
        "Expected cost (one product 28 ms; its compilation 2.6 s):\n"
        "  top: ~32 products, ~13.8 s expected\n"
        "  density: ~1,024 products, ~2.5 min expected\n"
        "  total ~58.0 s expected; Ctrl-C stops\n"
    )
    plan, single = parse_plan(text)
    assert plan == {"top": (32, 13.8), "density": (1024, 150.0)}
    assert single == pytest.approx(0.028)


@pytest.mark.slow
def test_quick_analysis_group(tmp_path):
    run_benchmark(
        "benchmarks", "--quick", "--only", "analysis", "--out", str(tmp_path), timeout=1200
    )
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["quick"] is True and [m["model"] for m in data["models"]] == ["resnet-bn", "lm1b"]
    md = (tmp_path / "analysis.md").read_text()
    assert "| resnet-bn |" in md and "| lm1b |" in md
    for m in data["models"]:
        assert m["layers_png_bytes"] > 10_000 and m["n"] > 100
        assert math.isfinite(m["top_eigenvalue"]) and m["product_s"] > 0
        assert "Expected cost" in m["progress_text"]
        for s in STAGES:
            st = m["stages"][s]
            assert st["num_matvecs"] > 0 and st["seconds"] > 0
            # the estimate was printed before the stage, and is sane (not a timing test)
            assert st["expected_seconds"] > 0 and math.isfinite(st["expected_seconds"])
            assert 1 / 100 < st["actual_over_expected"] < 100, (m["model"], s, st)
    lm = data["models"][1]
    assert "block/attn/query" in lm["labels"]  # one block at quick size: no index
