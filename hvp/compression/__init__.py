"""Compression (use layer): Hessian-based quantisation sensitivity and pruning saliency.

* :func:`quantization_sensitivity`: per-layer :math:`\\Omega_l(b)` of HAWQ (Dong et al. 2019,
  2020) with standard errors, per-layer top eigenvalues, a ranking and a bit allocation under a
  size budget (:meth:`QuantizationSensitivity.allocate`);
* :func:`obd_saliency`: Optimal Brain Damage saliencies (LeCun et al. 1990) and
  :func:`pruning_mask` at a requested sparsity;
* :func:`uniform_quantize`: the default symmetric per-output-channel quantiser.
"""

from hvp.compression._quantize import is_kernel, uniform_quantize
from hvp.compression._sensitivity import (
    BitAllocation,
    ObdSaliency,
    QuantizationSensitivity,
    obd_saliency,
    pruning_mask,
    quantization_sensitivity,
)

__all__ = [
    "BitAllocation",
    "ObdSaliency",
    "QuantizationSensitivity",
    "is_kernel",
    "obd_saliency",
    "pruning_mask",
    "quantization_sensitivity",
    "uniform_quantize",
]
