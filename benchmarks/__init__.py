"""Benchmark scripts of hvp (not timed tests): ``python -m benchmarks [--quick] [--only GROUP]``.

Groups (see ``benchmarks/README.md``):

* ``dense`` (:mod:`benchmarks.bench_dense_vs_hvp`) - HVP and ``hvp.eigsh`` vs dense ``jax.hessian`` + ``eigh``.
* ``modes`` (:mod:`benchmarks.bench_hvp_modes`) - HVP modes and batched probes vs one gradient.
* ``estimators`` (:mod:`benchmarks.bench_estimators`) - trace / SLQ error per matvec on known spectra.
* ``peers`` (:mod:`benchmarks.bench_peers`) - PyHessian, hessian-eigenthings and matfree side by side.
"""
