"""``hvp demo``: train a small NNX model on digits, checkpoint it, analyse it.

Everything runs offline on CPU in well under a minute at the defaults:

1. :func:`digits_mlp` builds a tanh MLP 64-32-10 (2,410 parameters) and the
   softmax cross-entropy loss. It is a plain model factory, importable as the
   model spec ``hvp.analysis._demo:digits_mlp``;
2. :func:`train` fits it with optax Adam on scikit-learn's bundled digits
   (mini-batches drawn with the seed, the whole run one compiled ``lax.scan``);
3. the model state is saved with ``orbax.checkpoint.StandardCheckpointer`` to
   ``<out>/checkpoint``;
4. :func:`hvp.analysis.analyze` analyses that checkpoint, exactly as
   ``hvp analyze <out>/checkpoint --model hvp.analysis._demo:digits_mlp --data digits --seed S``
   does (the report stores that command line), and writes ``report.json``,
   ``density.png`` and ``layers.png`` into ``<out>``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["digits_mlp", "DigitsMLP", "train", "save_checkpoint", "run_demo", "DEMO_MODEL_SPEC"]

#: The model spec of the demo model.
DEMO_MODEL_SPEC = "hvp.analysis._demo:digits_mlp"


class DigitsMLP(nnx.Module):
    """tanh MLP ``64 -> hidden -> 10`` for 8x8 digits flattened to 64 inputs."""

    def __init__(self, hidden: int = 32, *, rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def digits_mlp():
    """Model factory of the demo: ``(DigitsMLP(hidden=32), "cross_entropy")``.

    The initial weights are fixed (seed 0); an analysis replaces them with the
    checkpoint's.

    Examples:
        >>> import hvp
        >>> model, loss = hvp.analysis.digits_mlp()
        >>> type(model).__name__, loss
        ('DigitsMLP', 'cross_entropy')
    """
    return DigitsMLP(32, rngs=nnx.Rngs(0)), "cross_entropy"


def train(
    model, *, steps: int = 300, batch_size: int = 128, learning_rate: float = 1e-2, seed: int = 0
):
    """Fit ``model`` (in place) on digits with Adam; return ``(train_loss, train_accuracy, seconds)``.

    Needs optax (the ``demo`` extra: ``pip install "hvp-jax[demo]"``).
    """
    try:
        import optax
    except ImportError as e:
        from hvp.analysis._errors import AnalysisError

        raise AnalysisError(
            "Training the demo model needs the package 'optax', which is not installed: pip install \"hvp-jax[demo]\"."
        ) from e

    from hvp.analysis._data import digits
    from hvp.operators import losses

    x, y = digits()
    x, y = jnp.asarray(x), jnp.asarray(y)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(learning_rate)

    def loss_fn(p, xb, yb):
        return losses.softmax_cross_entropy(nnx.merge(graphdef, p, rest)(xb), yb)

    def step(carry, idx):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    rng = np.random.default_rng(seed)
    idx = jnp.asarray(
        np.stack(
            [rng.choice(len(x), size=min(batch_size, len(x)), replace=False) for _ in range(steps)]
        )
    )
    t0 = time.perf_counter()
    run = jax.jit(lambda p, s, idx: jax.lax.scan(step, (p, s), idx))
    (params, _), _ = run(params, opt.init(params), idx)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    nnx.update(model, params)
    logits = model(x)
    loss = float(losses.softmax_cross_entropy(logits, y))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == y))
    return loss, acc, seconds


def save_checkpoint(model, path) -> Path:
    """Save ``nnx.state(model)`` with ``ocp.StandardCheckpointer`` (overwriting ``path``)."""
    import orbax.checkpoint as ocp

    from hvp.analysis._checkpoint import _quiet_absl

    path = Path(path).absolute()
    with _quiet_absl():
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(path, nnx.state(model), force=True)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
    return path


def run_demo(
    *,
    out="hvp-demo-output",
    steps: int = 300,
    seed: int = 0,
    progress: bool = False,
    console=None,
    overwrite: bool = False,
    **analysis_kwargs,
):
    """Train, checkpoint and analyse the demo model; return the :class:`~hvp.analysis.AnalysisReport`.

    ``analysis_kwargs`` are the settings of the analysis (:class:`~hvp.analysis.AnalysisSettings`:
    ``k``, ``num_probes``, ...; validated before the training) and ``plots``; ``seed`` seeds
    both the training batches and the analysis. ``out`` is checked before training: it must be writable, and an
    ``out`` holding an earlier demo (``checkpoint/``, ``report.json``, the PNGs)
    is refused unless ``overwrite`` (which replaces the whole set).

    Examples:
        >>> import tempfile
        >>> from hvp.analysis import run_demo
        >>> report = run_demo(out=tempfile.mkdtemp(), steps=2, k=1, num_probes=2, num_iters=4,
        ...                   trace_method="hutchinson", trace_matvecs=4, layer_matvecs=2, plots=False)
        >>> report.extra["demo"]["train_steps"], report.model["spec"]
        (2, 'hvp.analysis._demo:digits_mlp')
    """
    from hvp.analysis._analyze import analyze
    from hvp.analysis._errors import setting_int

    steps = setting_int("steps", steps, 1, flag="--steps")
    from hvp.analysis._analyze import AnalysisSettings, check_dependencies
    from hvp.analysis._progress import Stages
    from hvp.analysis._report import prepare_output_dir

    plots = analysis_kwargs.pop("plots", True)
    # every setting is checked before the training, not after it
    settings = AnalysisSettings().replace(data="digits", seed=seed, **analysis_kwargs)
    check_dependencies(plots=plots)
    out = prepare_output_dir(out, overwrite=overwrite, extra=("checkpoint",))

    model, _ = digits_mlp()
    with Stages(enabled=progress, console=console) as stages:
        with stages.stage(f"Training {steps} steps (adam, digits)") as st:
            loss, acc, seconds = train(model, steps=steps, seed=seed)
            st.done(f"loss {loss:.4f}, accuracy {acc:.1%}")
        with stages.stage("Saving the checkpoint (orbax)") as st:
            ckpt = save_checkpoint(model, out / "checkpoint")
            st.done(str(ckpt))
    extra = {
        "demo": {
            "train_steps": steps,
            "train_seed": seed,
            "optimizer": "adam(1e-2)",
            "batch_size": 128,
            "train_loss": loss,
            "train_accuracy": acc,
            "train_seconds": seconds,
            "checkpoint": str(ckpt),
        }
    }
    return analyze(
        ckpt,
        model=DEMO_MODEL_SPEC,
        settings=settings,
        out_dir=out,
        plots=plots,
        progress=progress,
        console=console,
        extra=extra,
        overwrite=True,  # checked above, before training
    )
