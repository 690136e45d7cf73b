"""Data-set averaging: an operator over many batches equals the operator on the concatenated data."""

import jax
import numpy as np
import pytest
from problems import build, make_operator, operator, reference, relative_error

import hvp
from hvp import tree as tu
from hvp.operators._data import GroupMeta


def _v(op, seed=0):
    return tu.normal_like(jax.random.PRNGKey(seed), op.params)


def _close(a, b, tol=1e-12):
    return relative_error(tu.ravel(a), tu.ravel(b)) < tol


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_list_of_batches_equals_concatenated_batch(kind):
    p = build("nested")
    op_list = operator("nested", kind)
    op_cat = make_operator(p, kind, data=p.data)
    assert op_list.num_examples == op_cat.num_examples == 85
    assert (op_list.num_batches, op_cat.num_batches) == (4, 1)
    v = _v(op_list)
    assert _close(op_list @ v, op_cat @ v)


def test_batch_weights_are_by_size_not_uniform():
    # guard: with the odd last batch, a uniform average over batches would differ clearly
    p = build("nested")
    v = _v(operator("nested", "hessian"))
    per_batch = [make_operator(p, "hessian", data=b) @ v for b in p.batches]
    uniform = tu.scale(1.0 / len(per_batch), tu.stack(per_batch))
    uniform = jax.tree_util.tree_map(lambda x: x.sum(0), uniform)
    weighted = operator("nested", "hessian") @ v
    assert relative_error(tu.ravel(uniform), tu.ravel(weighted)) > 1e-3
    sizes = [24, 24, 24, 13]
    by_size = jax.tree_util.tree_map(
        lambda *xs: sum(n * x for n, x in zip(sizes, xs)) / 85, *per_batch
    )
    assert _close(by_size, weighted)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_reduction_sum(kind):
    p = build("nested")
    sizes = [b[0].shape[0] for b in p.batches]
    assert sizes == [24, 24, 24, 13]

    def sum_loss(params, batch):  # a sum over the examples of the batch
        return batch[0].shape[0] * p.loss_fn(params, batch)

    def sum_output_loss(out, y):
        return out.shape[0] * p.output_loss(out, y)

    if kind == "hessian":
        op = hvp.hessian(sum_loss, p.params, p.batches, reduction="sum")
    elif kind == "ggn":
        op = hvp.ggn(p.model_fn, sum_output_loss, p.params, p.batches, reduction="sum")
    else:
        op = hvp.empirical_fisher(sum_loss, p.params, p.batches, reduction="sum")
    assert op.reduction == "sum"
    ref = 85 * reference("nested", kind)  # the sum loss is N times the mean loss
    for seed in (0, 1):
        v = _v(op, seed)
        assert relative_error(tu.ravel(op @ v), ref @ np.asarray(tu.ravel(v))) < 1e-10


def test_generator_of_batches():
    p = build("nested")
    gen = (b for b in p.batches)
    op = hvp.hessian(p.loss_fn, p.params, gen)
    assert (op.num_examples, op.num_batches) == (85, 4)
    v = _v(op)
    assert _close(op @ v, operator("nested", "hessian") @ v, tol=1e-14)
    np.testing.assert_array_equal(tu.ravel(op @ v), tu.ravel(op @ v))  # read once and kept


def test_single_batch_is_not_split():
    p = build("nested")
    op = hvp.hessian(p.loss_fn, p.params, p.batches[0])  # a tuple is one batch
    assert (op.num_examples, op.num_batches) == (24, 1)


def test_equal_batches_are_stacked_into_one_scan():
    op = operator("nested", "hessian")
    assert op.dataset.meta == (
        GroupMeta(num_batches=3, batch_size=24, stacked=True),
        GroupMeta(num_batches=1, batch_size=13, stacked=False),
    )
    x_group = op.dataset.groups[0][0]
    assert x_group.shape == (3, 24, 3)
    jaxpr = str(jax.make_jaxpr(lambda o, v: o.mv(v))(op, _v(op)))
    assert jaxpr.count("scan[") == 1


def test_dict_batches_over_data_set():
    op = operator("dict_batch", "ggn")
    assert (op.num_examples, op.num_batches) == (85, 4)
    assert sorted(op.dataset.groups[0]) == ["image", "label"]
    assert op.dataset.groups[0]["image"].shape == (3, 24, 16)
    v = _v(op)
    np.testing.assert_allclose(
        tu.ravel(op @ v),
        reference("dict_batch", "ggn") @ np.asarray(tu.ravel(v)),
        rtol=1e-10,
        atol=1e-12,
    )
