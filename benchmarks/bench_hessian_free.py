"""Hessian-free optimization (``hvp.optim.hessian_free``) against Adam on scikit-learn digits.

Data: the 1,797 digits (64 pixels in [0, 1]) in a fixed shuffle (seed 0): 1,437 for training,
360 for testing. float32, one process, the same machine. Two tasks:

* **classifier**: the tanh MLP ``64-64-64-10`` of :mod:`benchmarks._models` (8,970
  parameters, weights from NumPy seed 0), softmax cross-entropy; test metric: accuracy.
* **autoencoder**: a deep tanh autoencoder ``64-128-64-16-64-128-64`` with a linear 16-unit
  code layer (the shape of Martens' 2010 benchmark, shrunk; 35,280 parameters, weights
  ``N(0, 1/fan_in)`` from NumPy seed 0) and the pixel-wise binary cross-entropy on its logits;
  the loss is reported *above its minimum* (the entropy of the targets); test metric: the
  same excess loss on the test images.

Optimizers:

* **Adam** (``optax.adam``): minibatches of 128 (reshuffled every epoch), the learning rate
  chosen from the grid ``ADAM_LRS`` by the final training loss; every rate's run is reported.
* **HF-GGN** (``hvp.optim.hessian_free`` with its defaults: GGN + CG, warm start 0.95,
  Levenberg-Marquardt damping from 1.0, line search, ``max_matvecs`` 50): full-batch gradient
  (one pass over the training set per step), curvature products on a random minibatch of
  ``CURVATURE_BATCH`` examples drawn each step (as Martens, 2010).
* **HF-Hessian**: the same with ``curvature="hessian"`` (MINRES on the damped Hessian).

Each optimizer's step is one ``jax.jit`` function, compiled before the clock starts (one
warm-up step from the initial weights, discarded). The clock measures training steps only
(``jax.block_until_ready`` on every step); the full training loss and the test metric are
evaluated after every epoch outside the clock. An *epoch* is one pass of gradients over the
training set: 11 Adam steps, or one HF step (whose curvature products on the minibatch are
extra passes, counted in the table as ``data passes``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hvp
import hvp.optim
from benchmarks import _common as C
from benchmarks._arrays import digits_np, mlp_params_np
from benchmarks._models import mlp_apply

GROUP = "hessian_free"
TITLE = "Hessian-free optimization vs Adam on digits (classifier and deep autoencoder)"

ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
ADAM_BATCH = 128
CURVATURE_BATCH = 512
MAX_MATVECS = 50
N_TRAIN = 1437


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    params: object
    model_fn: Callable
    output_loss: Callable
    unpack: Callable | None
    train: tuple  # a batch (inputs, targets)
    test: tuple
    floor: float  # the minimum of the training loss (reported losses are above it)
    test_floor: float
    metric: str
    adam_epochs: int
    hf_steps: int
    targets: tuple  # training losses (above the floor) for "time to reach"

    @property
    def loss(self):
        return hvp.operators.compose(self.model_fn, self.output_loss, self.unpack)


def _split():
    x, y = digits_np()
    idx = np.random.default_rng(0).permutation(len(y))
    x, y = x[idx].astype(np.float32), y[idx]
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


AE_SIZES = (64, 128, 64, 16, 64, 128, 64)
AE_CODE = 3  # the layer whose output (the 16-unit code) stays linear


def ae_apply(params, x):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1 and i != AE_CODE - 1:
            h = jnp.tanh(h)
    return h


def binary_cross_entropy(logits, targets):
    """Pixel-wise binary cross-entropy with logits, summed over pixels, mean over images."""
    return jnp.mean(jnp.sum(jax.nn.softplus(logits) - targets * logits, axis=-1))


def _entropy(t):
    t = np.clip(np.asarray(t, np.float64), 1e-12, 1 - 1e-12)
    return float(np.mean(np.sum(-(t * np.log(t) + (1 - t) * np.log(1 - t)), axis=-1)))


def _self_targets(x):
    return x, x


def tasks(quick: bool = False) -> list[Task]:
    (xtr, ytr), (xte, yte) = _split()
    clf = Task(
        name="classifier",
        params=jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), mlp_params_np(64, 0)),
        model_fn=mlp_apply,
        output_loss=hvp.losses.softmax_cross_entropy,
        unpack=None,
        train=(jnp.asarray(xtr), jnp.asarray(ytr)),
        test=(jnp.asarray(xte), jnp.asarray(yte)),
        floor=0.0,
        test_floor=0.0,
        metric="test accuracy",
        adam_epochs=3 if quick else 200,
        hf_steps=2 if quick else 60,
        targets=(0.1, 0.01, 0.001),
    )
    rng = np.random.default_rng(0)
    ae_params = [
        {
            "w": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
            "b": jnp.zeros(b, jnp.float32),
        }
        for a, b in zip(AE_SIZES[:-1], AE_SIZES[1:])
    ]
    ae = Task(
        name="autoencoder",
        params=ae_params,
        model_fn=ae_apply,
        output_loss=binary_cross_entropy,
        unpack=_self_targets,
        train=jnp.asarray(xtr),
        test=jnp.asarray(xte),
        floor=_entropy(xtr),
        test_floor=_entropy(xte),
        metric="test loss above its minimum",
        adam_epochs=3 if quick else 1000,
        hf_steps=2 if quick else 150,
        targets=(2.0, 1.0, 0.8),
    )
    return [clf, ae]


def _evaluator(task: Task):
    loss = task.loss

    @jax.jit
    def evaluate(params):
        if task.name == "classifier":
            x, y = task.test
            metric = jnp.mean(jnp.argmax(task.model_fn(params, x), axis=-1) == y)
        else:
            metric = loss(params, task.test) - task.test_floor
        return loss(params, task.train) - task.floor, metric

    return evaluate


def _record(history, evaluate, params, epoch, clock, extra=None):
    loss, metric = evaluate(params)
    wall, cpu = clock
    row = {
        "epoch": epoch,
        "time_s": wall,
        "cpu_s": cpu,
        "train_loss": float(loss),
        "metric": float(metric),
    }
    row.update(extra or {})
    history.append(row)


def _rows(batch, idx):
    return jax.tree_util.tree_map(lambda a: a[idx], batch)


def run_adam(task: Task, lr: float):
    opt = optax.adam(lr)
    loss = task.loss

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    evaluate = _evaluator(task)
    per_epoch = N_TRAIN // ADAM_BATCH
    params, state = task.params, opt.init(task.params)
    jax.block_until_ready(step(params, state, _rows(task.train, np.arange(ADAM_BATCH))))
    rng = np.random.default_rng(1)
    history, wall, cpu = [], 0.0, 0.0
    _record(history, evaluate, params, 0, (wall, cpu))
    for epoch in range(1, task.adam_epochs + 1):
        perm = rng.permutation(N_TRAIN)[: per_epoch * ADAM_BATCH]
        batches = [_rows(task.train, i) for i in np.split(perm, per_epoch)]
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches:
            params, state = step(params, state, batch)
        jax.block_until_ready(params)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        _record(history, evaluate, params, epoch, (wall, cpu))
    return history


def run_hf(task: Task, curvature: str):
    opt = hvp.optim.hessian_free(
        task.model_fn,
        task.output_loss,
        curvature=curvature,
        max_matvecs=MAX_MATVECS,
        unpack=task.unpack,
    )
    loss = task.loss

    @jax.jit
    def step(params, state, batch, curvature_batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, state = opt.update(
            grads, state, params, batch=batch, curvature_batch=curvature_batch, value=value
        )
        return optax.apply_updates(params, updates), state

    evaluate = _evaluator(task)
    rng = np.random.default_rng(1)

    def curvature_batch():
        return _rows(task.train, np.sort(rng.choice(N_TRAIN, CURVATURE_BATCH, replace=False)))

    params, state = task.params, opt.init(task.params)
    jax.block_until_ready(step(params, state, task.train, curvature_batch()))  # compile
    history, wall, cpu, products = [], 0.0, 0.0, 0
    _record(history, evaluate, params, 0, (wall, cpu), {"damping": float(state.damping)})
    for epoch in range(1, task.hf_steps + 1):
        cb = curvature_batch()
        t0, c0 = time.perf_counter(), time.process_time()
        params, state = step(params, state, task.train, cb)
        jax.block_until_ready(params)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        products += int(state.num_matvecs)
        _record(
            history,
            evaluate,
            params,
            epoch,
            (wall, cpu),
            {
                "damping": float(state.damping),
                "rho": float(state.rho),
                "step_size": float(state.step_size),
                "num_matvecs": int(state.num_matvecs),
                "converged": bool(state.converged),
                "products_total": products,
            },
        )
    return history


def _time_to(history, target):
    for row in history:
        if row["train_loss"] <= target:
            return row["time_s"], row["cpu_s"], row["epoch"]
    return None, None, None


def _draw(rep, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        rep.notes.append("hessian_free.png: not drawn (matplotlib is not installed)")
        return
    from hvp._io import atomic_savefig

    fig, axes = plt.subplots(len(results), 2, figsize=(11.0, 4.0 * len(results)), squeeze=False)
    for row, (task, runs) in zip(axes, results.items()):
        for name, hist in runs.items():
            loss = [r["train_loss"] for r in hist]
            row[0].plot([r["time_s"] for r in hist], loss, label=name)
            row[1].plot([r["epoch"] for r in hist], loss, label=name)
        ylabel = "training loss" if task == "classifier" else "training loss above its minimum"
        for ax, xlabel in zip(row, ("wall-clock training time (s)", "epochs (gradient passes)")):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(task)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(TITLE)
    fig.tight_layout()
    rep.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, rep.out_dir / "hessian_free.png", dpi=100)
    plt.close(fig)
    rep.figures.append("hessian_free.png")


def run(out_dir, *, quick: bool = False) -> C.Report:
    rep = C.Report(GROUP, TITLE, out_dir, quick=quick)
    rep.data["environment"] = C.environment()
    lrs = ADAM_LRS[1:3] if quick else ADAM_LRS
    rep.data["settings"] = {
        "adam_lrs": list(lrs),
        "adam_batch": ADAM_BATCH,
        "curvature_batch": CURVATURE_BATCH,
        "max_matvecs": MAX_MATVECS,
        "train_examples": N_TRAIN,
    }
    results, rep.data["tasks"] = {}, {}
    for task in tasks(quick):
        t0 = time.perf_counter()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        adam = {lr: run_adam(task, lr) for lr in lrs}
        best = min(adam, key=lambda lr: adam[lr][-1]["train_loss"])
        hf = {c: run_hf(task, c) for c in ("ggn", "hessian")}
        runs = {
            f"Adam (lr {best:g})": adam[best],
            "HF-GGN (CG)": hf["ggn"],
            "HF-Hessian (MINRES)": hf["hessian"],
        }
        results[task.name] = runs
        rep.data["tasks"][task.name] = {
            "num_params": int(sum(a.size for a in jax.tree_util.tree_leaves(task.params))),
            "loss_floor": task.floor,
            "metric": task.metric,
            "adam_epochs": task.adam_epochs,
            "hf_steps": task.hf_steps,
            "adam_best_lr": best,
            "adam": {str(lr): h for lr, h in adam.items()},
            "hf": hf,
            "wall_s": time.perf_counter() - t0,
            "load_average": load,
        }
        _tables(rep, task, runs, adam, best, hf)
    _draw(rep, results)
    return rep


def _tables(rep, task, runs, adam, best, hf):
    rows = []
    for name, hist in runs.items():
        last = hist[-1]
        passes = last["epoch"]
        if "products_total" in last:  # each product: one pass over the curvature minibatch
            passes += last["products_total"] * CURVATURE_BATCH / N_TRAIN
        reach = []
        for target in task.targets:
            t, c, e = _time_to(hist, target)
            reach.append("-" if t is None else f"{t:.2f} s / {c:.2f} s / {e}")
        rows.append(
            [
                name,
                last["epoch"],
                f"{passes:.0f}",
                f"{last['train_loss']:.4g}",
                f"{last['metric']:.4g}",
                f"{last['time_s']:.2f} s / {last['cpu_s']:.2f} s",
                *reach,
            ]
        )
    above = "" if task.name == "classifier" else " above its minimum"
    rep.table(
        f"{task.name}: final results",
        [
            "optimizer",
            "epochs",
            "data passes",
            f"train loss{above}",
            task.metric,
            "training time (wall / CPU)",
            *[f"wall / CPU / epochs to {t:g}" for t in task.targets],
        ],
        rows,
        note=(
            "Epochs are passes of gradients over the training set; `data passes` adds the "
            "HF curvature products (one per product over its minibatch of "
            f"{CURVATURE_BATCH} examples). Time excludes compilation and evaluation; the CPU "
            "time is the process's (all its threads). Load average when the task started: "
            f"{rep.data['tasks'][task.name]['load_average']:.1f} on "
            f"{os.cpu_count()} cores (other jobs on the machine make the wall-clock times noisy)."
            + (
                f" Loss minimum (entropy of the training images): {task.floor:.4f}."
                if task.floor
                else ""
            )
        ),
    )
    rep.table(
        f"{task.name}: Adam learning-rate grid ({task.adam_epochs} epochs)",
        ["lr", f"final train loss{above}", task.metric, "training time"],
        [
            [
                f"{lr:g}",
                f"{h[-1]['train_loss']:.4g}",
                f"{h[-1]['metric']:.4g}",
                f"{h[-1]['time_s']:.2f} s",
            ]
            for lr, h in adam.items()
        ],
        note=f"Best by final training loss: lr = {best:g}.",
    )
    hf_rows = []
    for c, hist in hf.items():
        steps = hist[1:]
        hf_rows.append(
            [
                c,
                f"{np.mean([r['num_matvecs'] for r in steps]):.1f}",
                f"{sum(r['converged'] for r in steps)}",
                f"{sum(r['step_size'] == 0 for r in steps)}",
                f"{np.median([r['step_size'] for r in steps]):.3g}",
                f"{steps[0]['damping']:.3g} -> {steps[-1]['damping']:.3g}",
                f"{np.median([r['time_s'] - p['time_s'] for p, r in zip(hist, steps)]) * 1e3:.1f} ms",
            ]
        )
    rep.table(
        f"{task.name}: Hessian-free steps ({task.hf_steps})",
        [
            "curvature",
            "products / step",
            "solves converged",
            "rejected steps",
            "median step size",
            "damping (after first -> last step)",
            "median step time",
        ],
        hf_rows,
    )


if __name__ == "__main__":
    import sys
    from pathlib import Path

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else C.RESULTS / C.device_name()
    report = run(out)
    report.write()
    C.print_markdown(report.markdown())
