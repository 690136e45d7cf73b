"""Benchmark scripts of hvp (not timed tests): ``python -m benchmarks [--quick] [--only GROUP]``.

Groups (see ``benchmarks/README.md``):

* ``dense`` (:mod:`benchmarks.bench_dense_vs_hvp`) - HVP and ``hvp.eigsh`` vs dense ``jax.hessian`` + ``eigh``.
* ``modes`` (:mod:`benchmarks.bench_hvp_modes`) - HVP modes and batched probes vs one gradient.
* ``estimators`` (:mod:`benchmarks.bench_estimators`) - trace / SLQ error per matvec on known spectra.
* ``peers`` (:mod:`benchmarks.bench_peers`) - PyHessian, hessian-eigenthings and matfree side by side.
* ``analysis`` (:mod:`benchmarks.bench_analysis`) - every ``hvp analyze`` stage on Flax-example shapes.
* ``coldwarm`` (:mod:`benchmarks.bench_cold_warm`) - cold (fresh process) and warm times against the
  peers on the MLP and an NNX transformer LM, and ``hvp demo``'s analysis time (issue 11's targets).
"""
