"""Curvature operators (layer 1): Hessian, GGN and empirical Fisher over data sets.

Builds on :mod:`hvp.tree`; consumed by :mod:`hvp.linalg`.
"""

from hvp.operators import _losses as losses
from hvp.operators._base import (
    BLOCK_MODES,
    DEFAULT_DENSE_LIMIT,
    DenseOperator,
    LinearOperator,
    MatvecOperator,
    NonFiniteError,
    as_operator,
    as_zeros,
    from_dense,
    from_matvec,
)
from hvp.operators._blocks import merge, select
from hvp.operators._curvature import (
    DEFAULT_LINEARIZE_BUDGET,
    Composed,
    CurvatureOperator,
    compose,
    default_unpack,
    empirical_fisher,
    ggn,
    hessian,
    hvp,
)
from hvp.operators._data import (
    Dataset,
    UnpackError,
    as_dataset,
    batch_weights,
    split_batch,
    weighted_sum,
)
from hvp.operators._value import batch_loss, data_loss, data_loss_and_grad

__all__ = [
    "BLOCK_MODES",
    "DEFAULT_DENSE_LIMIT",
    "DEFAULT_LINEARIZE_BUDGET",
    "Composed",
    "CurvatureOperator",
    "UnpackError",
    "Dataset",
    "DenseOperator",
    "LinearOperator",
    "MatvecOperator",
    "NonFiniteError",
    "as_dataset",
    "as_operator",
    "as_zeros",
    "batch_loss",
    "batch_weights",
    "compose",
    "data_loss",
    "data_loss_and_grad",
    "default_unpack",
    "empirical_fisher",
    "from_dense",
    "from_matvec",
    "ggn",
    "hessian",
    "hvp",
    "losses",
    "merge",
    "select",
    "split_batch",
    "weighted_sum",
]
