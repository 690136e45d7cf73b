"""Train a Flax NNX MLP on scikit-learn digits and watch its sharpness approach 2/lr.

Full-batch gradient descent (optax SGD) on 1,000 digits from a small
initialisation; every few steps a :class:`hvp.CurvatureMonitor` computes the
top Hessian eigenvalue (Lanczos, warm-started) and the Hessian trace
(Hutchinson) of the training loss, and at the first and last step its spectral
density. With learning rate ``lr`` the sharpness rises from about 0.2 until it
reaches ``2/lr`` (the edge of stability, Cohen et al. 2021), hovers there while
the loss keeps falling, and decreases late in training as the cross-entropy
flattens.

    python examples/train_digits_monitor.py --steps 300 --out ./monitor-output

Writes ``history.jsonl``, ``history.csv``, ``sharpness.png`` and
``summary.json`` into ``--out`` and prints the fraction of the wall time spent
in the monitor.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hvp
import hvp.flax
from hvp.monitor import CurvatureMonitor


class MLP(nnx.Module):
    def __init__(self, sizes, *, init_scale: float = 1.0, rngs: nnx.Rngs):
        # kernels ~ N(0, init_scale^2 / fan_in): a small scale starts flat, so the sharpness has to grow
        init = nnx.initializers.variance_scaling(init_scale**2, "fan_in", "normal")
        self.layers = nnx.List(
            [nnx.Linear(a, b, kernel_init=init, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def load_digits(num: int, seed: int):
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))[:num]
    x = (d.data[idx] / 16.0 - 0.5).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(d.target[idx].astype(np.int32))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps (full-batch GD)")
    p.add_argument("--every", type=int, default=10, help="monitor every N steps")
    p.add_argument("--lr", type=float, default=0.5, help="learning rate (the 2/lr line)")
    p.add_argument(
        "--init-scale", type=float, default=0.3, help="initial weight scale (times 1/sqrt(fan_in))"
    )
    p.add_argument("--num-train", type=int, default=1000, help="training examples (one full batch)")
    p.add_argument("--hidden", type=int, default=32, help="hidden width")
    p.add_argument("--k", type=int, default=1, help="top eigenvalues to track")
    p.add_argument("--trace-matvecs", type=int, default=20, help="Hutchinson probes per evaluation")
    p.add_argument(
        "--measure-cold-start",
        action="store_true",
        help="also run cold-started Lanczos to measure the warm-start savings (slower)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="./monitor-output", help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    x, y = load_digits(args.num_train, args.seed)
    model = MLP(
        [64, args.hidden, args.hidden, 10], init_scale=args.init_scale, rngs=nnx.Rngs(args.seed)
    )
    optimizer = nnx.Optimizer(model, optax.sgd(args.lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: hvp.losses.softmax_cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    # --- the monitor: a handful of lines in an existing loop ---------------------------------
    problem = hvp.flax.from_nnx(model, "cross_entropy")
    last = args.steps - 1
    monitor = CurvatureMonitor.from_flax(
        problem,
        (x, y),
        every=args.every,
        k=args.k,
        trace_matvecs=args.trace_matvecs,
        density_steps=[0, last],
        learning_rate=args.lr,
        output_dir=args.out,
        key=jax.random.key(args.seed),
        measure_cold_start=args.measure_cold_start,
        verbose=False,
    )

    from rich.progress import Progress

    start = time.perf_counter()
    loss = None
    with Progress(transient=True) as progress:
        task = progress.add_task("training", total=args.steps)
        for step in range(args.steps):
            loss = train_step(model, optimizer, x, y)
            record = monitor(step, model)
            if record is not None:
                progress.update(
                    task, description=f"loss {float(loss):.3f}  sharpness {record.sharpness:.3f}"
                )
            progress.advance(task)
    jax.block_until_ready(loss)
    total = time.perf_counter() - start
    # ------------------------------------------------------------------------------------------

    png = monitor.plot(
        os.path.join(args.out, "sharpness.png"),
        title=f"NNX MLP on digits, full-batch GD, lr = {args.lr}",
    )
    summary = monitor.summary(total).to_dict()
    summary.update(
        lr=args.lr,
        two_over_lr=2.0 / args.lr,
        steps=args.steps,
        final_loss=None if loss is None else float(loss),
        plot=png,
    )
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print(f"trained {args.steps} steps in {total:.1f} s; final loss {summary['final_loss']:.4f}")
    print(
        f"sharpness: first {monitor.history[0].sharpness:.3f}, max {summary['max_sharpness']:.3f}, "
        f"final {summary['final_sharpness']:.3f}; 2/lr = {2.0 / args.lr:.3f}"
    )
    print(
        f"monitor: {summary['num_evaluations']} evaluations, {summary['num_matvecs']} Hessian-vector "
        f"products, {summary['seconds']:.1f} s = {100 * summary['overhead']:.1f}% of the wall time "
        f"(the first evaluation, {summary['first_seconds']:.1f} s, includes compilation; after it "
        f"{100 * summary['overhead_after_first']:.1f}%)"
    )
    if summary["warm_start_savings"] is not None:
        print(
            f"warm start: {summary['eig_matvecs']} Lanczos products vs {summary['cold_eig_matvecs']} cold "
            f"({100 * summary['warm_start_savings']:.0f}% fewer)"
        )
    print(f"outputs in {os.path.abspath(args.out)}")
    return summary


if __name__ == "__main__":
    main()
