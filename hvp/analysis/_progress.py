"""Rich progress display for the stages of an analysis (one line per stage), with time estimates.

Progress is shown per stage: a spinner and the elapsed time while it runs, then
its cost (matvecs) when it ends (the analysis passes ``progress=False`` to the
algorithms, whose own displays would compete with the stage lines). Reading the
data advances per batch.

Before the expensive stages start, :meth:`Stages.estimate` measures the cost of
one operator product (:func:`measure_product`: a single product, and a block of
products as the probe-batched stages run them) and prints the plan: for each
stage, its expected number of products (:func:`stage_products`) and seconds
(:func:`expected_seconds`), so that a user can stop early (Ctrl-C) and pick
smaller settings. Each stage line then shows ``~N products, ~T s expected``
while it runs and the actual figures when it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

__all__ = ["Stages", "ProductCost", "measure_product", "stage_products", "expected_seconds"]

#: Stage names of an analysis, in order (the keys of :func:`stage_products`).
STAGE_NAMES = ("top", "bottom", "trace", "density", "layers")
#: Expected total above which the plan suggests smaller settings (seconds).
LONG_RUN_S = 60.0
#: Products' expected total (at the single-product cost) above which the block product is timed too.
BLOCK_CHECK_S = 5.0


@dataclasses.dataclass(frozen=True)
class ProductCost:
    """Measured cost of operator products (seconds, compiled, after a warm-up call).

    Attributes:
      single_s: one product ``A v``.
      block_s: per vector of a block product ``A [v_1 .. v_b]`` (vmapped, as the probe-batched
        stages run them); equals ``single_s`` when ``block_size`` is 1.
      block_size: ``b``.
      compile_s: compilation time of the single product (first call minus a warm one); a
        stage's own compilation is a multiple of it (:data:`COMPILE_FACTORS`).
    """

    single_s: float
    block_s: float
    block_size: int
    compile_s: float


def _wall(fn) -> float:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def measure_product(op, *, block_size: int = 1) -> ProductCost:
    """Time one product of ``op`` (and a block of ``block_size``) after compiling it.

    Costs three single products and two block products plus their compilations (the
    fastest warm call counts). The vector is all ones (the timing does not depend on it).

    Args:
      op: a :class:`hvp.LinearOperator` (its public ``matvec`` and ``matmat`` are timed).
      block_size: vectors per block product (>= 1); 1 skips the block measurement.

    Returns:
      A :class:`ProductCost`.

    Example:
      >>> import jax.numpy as jnp, hvp
      >>> cost = measure_product(hvp.from_dense(jnp.eye(3)), block_size=2)
      >>> cost.single_s > 0 and cost.block_s > 0 and cost.block_size
      2
    """
    import jax
    import jax.numpy as jnp

    from hvp.linalg._checks import check_int

    block_size = check_int("block_size", block_size, minimum=1)
    v = jax.tree_util.tree_map(jnp.ones_like, op.like)
    first = _wall(lambda: op.matvec(v))
    single = min(_wall(lambda: op.matvec(v)), _wall(lambda: op.matvec(v)))
    cost = ProductCost(
        single_s=single, block_s=single, block_size=1, compile_s=max(first - single, 0.0)
    )
    return _with_block(op, cost, block_size) if block_size > 1 else cost


def _with_block(op, cost: ProductCost, block_size: int) -> ProductCost:
    """``cost`` with the per-vector time of a block product of ``block_size`` (after compiling it)."""
    import jax
    import jax.numpy as jnp

    vs = jax.tree_util.tree_map(lambda x: jnp.ones((block_size, *x.shape), x.dtype), op.like)
    _wall(lambda: op.matmat(vs))
    block = _wall(lambda: op.matmat(vs)) / block_size
    return dataclasses.replace(cost, block_s=block, block_size=block_size)


def stage_products(
    *,
    n: int,
    k: int,
    eig_iters: int | None,
    trace_matvecs: int,
    num_probes: int,
    num_iters: int,
    layer_matvecs: int,
) -> dict[str, int]:
    """Expected operator products of each stage of an analysis of an ``n``-parameter model.

    ``top``/``bottom`` (:func:`hvp.linalg.eigsh` with ``k`` pairs at one end, a basis of
    ``m = eig_iters`` vectors, default ``max(2k + 10, 30)``, capped at ``n``): an estimate of
    the typical cost, not a bound (the Lanczos steps stop as soon as the residual bound
    passes). For ``k = 1`` one Lanczos sequence, counted as one basis, plus one residual
    check: ``m + 1``. For ``k > 1`` the wanted set's sequence and the two confirming sequences
    from fresh vectors, a basis each, plus ``k`` residual checks: ``3m + k``. Measured with the
    default ``m = 30`` (float64, ``tol=1e-6``, 334- and 410-parameter MLP and CNN Hessians):
    13-34 products for ``k = 1`` (estimate 31), 49-146 for ``k = 2 .. 5`` (estimate 92-95).
    ``trace``: ``trace_matvecs``; ``density``: ``num_probes * num_iters``; ``layers``:
    ``layer_matvecs`` (all capped at ``n``).

    Example:
      >>> stage_products(n=1000, k=5, eig_iters=None, trace_matvecs=99, num_probes=16,
      ...                num_iters=64, layer_matvecs=64)
      {'top': 95, 'bottom': 95, 'trace': 99, 'density': 1024, 'layers': 64}
      >>> stage_products(n=1000, k=1, eig_iters=None, trace_matvecs=99, num_probes=16,
      ...                num_iters=64, layer_matvecs=64)["top"]
      31
    """
    m = min(eig_iters if eig_iters is not None else max(2 * k + 10, 30), n)
    eig = m + 1 if k == 1 else 3 * m + k
    return {
        "top": eig,
        "bottom": eig,
        "trace": min(trace_matvecs, n),
        "density": num_probes * min(num_iters, n),
        "layers": min(layer_matvecs, n),
    }


#: Compilation of a stage's program in units of the compilation of one product (each stage
#: compiles its own program with the product inlined, plus its linear algebra: Lanczos with
#: restarts and a vmapped residual check, Hutch++'s two probe blocks and QR, ...). Measured on
#: the ResNet-BN and lm1b shapes of ``benchmarks/bench_analysis.py`` (CPU): 5.6-8.9 (eigenvalues),
#: 4.7-5.2 (trace), 5.6-6.1 (density), 2.6-3.5 (per-layer trace); the lower ends are used.
#: These were measured with the compiled driver (one program per stage, product inlined); the
#: host driver that runs the stages now shares the operator's compiled products (the ones
#: :func:`measure_product` already compiled) and adds small step programs, so they likely
#: overestimate the compilation; not re-measured yet.
COMPILE_FACTORS = {"top": 5.0, "bottom": 5.0, "trace": 4.0, "density": 5.0, "layers": 2.5}


def expected_seconds(stage: str, num_products: int, cost: ProductCost) -> float:
    """Expected seconds of a stage: its compilation plus its products.

    ``COMPILE_FACTORS[stage] * compile_s + num_products * per_product``, where the eigenvalue
    stages apply one vector at a time (``single_s``) and the probe-batched stages (trace,
    density, per-layer trace) apply blocks (``block_s``). The linear algebra between products
    is not included (small next to the products for large models, where the estimate
    matters); compilation dominates on small models, where the factors make it a rough guess.

    Example:
      >>> expected_seconds("trace", 10, ProductCost(0.5, 0.25, 4, 1.0))
      6.5
    """
    per = cost.single_s if stage in ("top", "bottom") else cost.block_s
    return COMPILE_FACTORS.get(stage, 1.0) * cost.compile_s + num_products * per


def _secs(t: float) -> str:
    if not math.isfinite(t):
        return "?"
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1:
        return f"{t * 1e3:.0f} ms" if t < 0.1 else f"{t:.2f} s"
    if t < 120:
        return f"{t:.1f} s"
    if t < 7200:
        return f"{t / 60:.1f} min"
    return f"{t / 3600:.1f} h"


class _NullStage:
    def done(self, text: str = "") -> None:
        pass

    def advance_to(self, completed: int) -> None:
        pass


class _Stage(_NullStage):
    def __init__(self, progress, task, guess=None):
        self._progress = progress
        self._task = task
        self._guess = guess

    def done(self, text: str = "") -> None:
        if self._guess is not None:
            text = f"{text} (expected ~{_secs(self._guess[1])})"
        self._progress.update(self._task, info=text)

    def advance_to(self, completed: int) -> None:
        self._progress.update(self._task, completed=completed)


class Stages:
    """Context manager showing one rich progress line per stage (no-op when disabled)."""

    def __init__(self, *, enabled: bool = True, console=None):
        self.enabled = enabled
        self._console = console
        self._progress = None
        #: ``{stage: (products, seconds)}`` after :meth:`estimate`.
        self.expected: dict[str, tuple[int, float]] = {}
        self.cost: ProductCost | None = None

    def estimate(self, op, products: dict[str, int], *, block_size: int = 1, labels=None) -> None:
        """Measure one product of ``op`` and print the expected products and time of each stage.

        Does nothing when the display is off (no terminal, ``--quiet``): the measurement costs a
        few products and a compilation (two when the products add up to more than
        :data:`BLOCK_CHECK_S` seconds, which also times a block of ``block_size`` products).

        Args:
          op: the operator the stages will use.
          products: ``{stage: expected products}`` (:func:`stage_products`).
          block_size: vectors per block of the probe-batched stages.
          labels: ``{stage: text}`` names for the printed plan (default: the stage keys).
        """
        if self._progress is None:
            return
        cost = measure_product(op)
        if block_size > 1 and cost.single_s * sum(products.values()) > BLOCK_CHECK_S:
            # products matter here: time the probe blocks too (vmapped products can cost more
            # per vector than single ones, e.g. convolutions on CPU)
            cost = _with_block(op, cost, block_size)
        self.cost = cost
        self.expected = {
            name: (int(p), expected_seconds(name, int(p), cost)) for name, p in products.items()
        }
        labels = labels or {}
        total = sum(t for _, t in self.expected.values())
        per = f"one product {_secs(cost.single_s)}"
        if cost.block_size > 1:
            per += f", {_secs(cost.block_s)} per vector in blocks of {cost.block_size}"
        lines = [f"[bold]Expected cost[/] ({per}; its compilation {_secs(cost.compile_s)}):"]
        for name, (p, t) in self.expected.items():
            lines.append(f"  {labels.get(name, name)}: ~{p:,} products, ~{_secs(t)} expected")
        lines.append(f"  total ~{_secs(total)} expected; Ctrl-C stops")
        if total > LONG_RUN_S:
            lines.append(
                "  [yellow]long run:[/] fewer products with --probes, --iters, --trace-matvecs, "
                "--layer-matvecs, -k, or less data with --num-batches"
            )
        self._progress.console.print("\n".join(lines))

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            console = self._console or Console(stderr=True)
            if not console.is_terminal and self._console is None:
                # not a terminal (a log file, a pipe, a test): no progress lines, stderr stays clean
                self.enabled = False
                return self
            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓"),
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                TimeElapsedColumn(),
                TextColumn("[dim]{task.fields[info]}"),
                console=console,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
        return False

    @contextlib.contextmanager
    def stage(self, description: str, *, total: int | None = None, expect: str | None = None):
        """One progress line of a stage.

        With ``expect`` (a stage of :meth:`estimate`) the line shows the expected products and
        time while the stage runs, and the expected time next to the result at the end.
        """
        if self._progress is None:
            yield _NullStage()
            return
        guess = self.expected.get(expect) if expect is not None else None
        info = f"~{guess[0]:,} products, ~{_secs(guess[1])} expected" if guess else ""
        task = self._progress.add_task(description, total=total, info=info)
        try:
            yield _Stage(self._progress, task, guess)
        except BaseException:
            self._progress.update(task, info="[red]failed")
            self._progress.stop_task(task)
            raise
        t = self._progress.tasks[task]
        # mark complete (an unknown total becomes the count reached, at least 1)
        final = t.total if t.total is not None else max(t.completed, 1)
        self._progress.update(task, total=final, completed=final)
        self._progress.stop_task(task)
