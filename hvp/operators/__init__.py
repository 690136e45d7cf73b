"""Curvature operators (layer 1): Hessian, GGN, empirical Fisher and Fisher over data sets.

Operators combine into operators (``G + 1e-3``, ``2.0 * H``, ``G - H``,
:func:`from_diagonal`; see :mod:`hvp.operators._algebra`), and every operator
has ``psd``.

Builds on :mod:`hvp.tree`; consumed by :mod:`hvp.linalg`.
"""

from hvp.operators import _losses as losses
from hvp.operators._algebra import DiagonalOperator, SumOperator, from_diagonal, identity
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
    StreamingCurvatureOperator,
    compose,
    default_unpack,
    empirical_fisher,
    fisher,
    ggn,
    hessian,
    hvp,
)
from hvp.operators._data import (
    DEFAULT_STREAM_BUDGET,
    ArrayBatches,
    Dataset,
    NonDeterministicDataError,
    StreamingDataset,
    UnpackError,
    as_data,
    as_dataset,
    batch_weights,
    check_finite_data,
    default_stream_budget,
    split_batch,
    weighted_sum,
)
from hvp.operators._gradient import data_gradient
from hvp.operators._value import batch_loss, data_loss, data_loss_and_grad

__all__ = [
    "ArrayBatches",
    "DEFAULT_STREAM_BUDGET",
    "NonDeterministicDataError",
    "check_finite_data",
    "StreamingCurvatureOperator",
    "StreamingDataset",
    "as_data",
    "default_stream_budget",
    "BLOCK_MODES",
    "DEFAULT_DENSE_LIMIT",
    "DEFAULT_LINEARIZE_BUDGET",
    "Composed",
    "CurvatureOperator",
    "UnpackError",
    "Dataset",
    "DenseOperator",
    "DiagonalOperator",
    "LinearOperator",
    "MatvecOperator",
    "NonFiniteError",
    "as_dataset",
    "as_operator",
    "as_zeros",
    "batch_loss",
    "batch_weights",
    "compose",
    "data_gradient",
    "data_loss",
    "data_loss_and_grad",
    "default_unpack",
    "empirical_fisher",
    "fisher",
    "from_dense",
    "from_diagonal",
    "from_matvec",
    "ggn",
    "hessian",
    "hvp",
    "identity",
    "losses",
    "merge",
    "select",
    "split_batch",
    "SumOperator",
    "weighted_sum",
]
