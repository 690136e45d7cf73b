"""Matrix-free algorithms (layer 2): they take any :class:`hvp.operators.LinearOperator`
(or a matvec with an example pytree) and know nothing of models or data.
"""

# --- eigen: Lanczos / power iteration / spectral density (owned by the eigen work) ---
# --- end eigen ---

# --- estimators: trace / diagonal / Frobenius (owned by the estimator work) ---
# --- end estimators ---
