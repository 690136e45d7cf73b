r"""Uniform quantisers: what :func:`hvp.compression.quantization_sensitivity` perturbs the weights by.

The default is the *symmetric per-output-channel uniform* quantiser of HAWQ (Dong et al.
2019) and of most post-training quantisation work (Krishnamoorthi, 2018, "Quantizing deep
convolutional networks for efficient inference"): for :math:`b` bits and an output channel
:math:`c` (the last axis of a Flax ``Dense``/``Conv`` kernel),

.. math:: s_c = \frac{\max_i |W_{ic}|}{2^{b-1}-1}, \qquad
          Q_b(W)_{ic} = s_c\,\operatorname{clip}\!\big(\operatorname{round}(W_{ic}/s_c),
          -(2^{b-1}-1),\ 2^{b-1}-1\big),

:math:`2^b - 1` levels symmetric around 0 (0 exactly representable), so each entry moves by
at most :math:`s_c/2`. A leaf with fewer than two axes (a bias) is quantised per tensor.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["uniform_quantize", "is_kernel"]


def uniform_quantize(w, bits: int):
    r"""Symmetric uniform quantisation of ``w`` to ``bits`` bits, one scale per output channel.

    Args:
      w: an array; channels along the last axis when ``w.ndim >= 2`` (a Flax kernel
        ``(in, out)`` or ``(h, w, in, out)``), one scale for the whole array otherwise.
      bits: an int ``>= 2`` (``2**(bits-1) - 1`` positive levels; 1 bit has none).

    Returns:
      The quantised values :math:`Q_b(w)` (dequantised: same shape and dtype as ``w``); a
      channel of zeros stays zero.

    Raises:
      ValueError: ``bits < 2``.
      TypeError: ``bits`` not an int.

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.compression import uniform_quantize
      >>> w = jnp.array([[0.9, -3.0], [0.2, 1.4]])  # two output channels (columns)
      >>> uniform_quantize(w, 2)  # 3 levels per channel: -max, 0, +max
      Array([[ 0.9, -3. ],
             [ 0. ,  0. ]], dtype=float64)
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"`bits` must be an int, got {type(bits).__name__} ({bits!r}).")
    if bits < 2:
        raise ValueError(
            f"`bits` must be at least 2 for a symmetric quantiser (2**(bits-1) - 1 positive "
            f"levels), got {bits}."
        )
    w = jnp.asarray(w)
    levels = float(2 ** (int(bits) - 1) - 1)
    axes = tuple(range(w.ndim - 1)) if w.ndim >= 2 else None
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=w.ndim >= 2) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / safe), -levels, levels) * safe
    return jnp.where(scale > 0, q, 0.0).astype(w.dtype)


def is_kernel(path: str, leaf) -> bool:  # noqa: ARG001 - the path is part of the predicate API
    """Default leaf filter of quantisation and pruning: leaves with at least two axes (kernels).

    Biases, norm scales and other vectors stay at full precision and are never pruned (their
    size is negligible and their errors are not what HAWQ or OBD rank).

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.compression import is_kernel
      >>> is_kernel("Dense_0/kernel", jnp.zeros((3, 4))), is_kernel("Dense_0/bias", jnp.zeros(4))
      (True, False)
    """
    return np.ndim(leaf) >= 2
