"""Optimizers built on curvature products (a use layer: imports hvp.tree, operators, linalg).

* :func:`hessian_free` - Martens' (2010) Hessian-free optimization as an optax
  ``GradientTransformationExtraArgs``: damped GGN (CG) or Hessian (MINRES)
  steps, warm-started, with Levenberg-Marquardt damping and a backtracking
  line search; the whole step runs inside the user's ``jax.jit``.
"""

from hvp.optim._hessian_free import HessianFreeState, hessian_free

__all__ = ["hessian_free", "HessianFreeState"]
