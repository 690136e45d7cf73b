"""Group 4 - hvp next to PyHessian, hessian-eigenthings and matfree, at matched accuracy.

The problem is the tanh MLP ``64-w-w-10`` on all 1,797 digits (float32), the same
weights and data in JAX and in PyTorch (:mod:`benchmarks.peers_torch`; the loss and
one HVP are checked to agree before anything is timed). matfree runs on hvp's own
JAX matvec. Four tasks:

* **top eigenvalue** and **top-5 eigenvalues**: the time each library needs to reach
  the same error against a reference (the dense float64 ``eigh`` where n <= 10,000,
  else ``hvp.eigsh`` in float64 with residuals below 1e-9 of the top eigenvalue,
  which bounds its eigenvalue error by the same). Lanczos-type methods (hvp.eigsh
  swept over ``tol``; matfree, hessian-eigenthings ``lanczos`` swept over the number
  of steps) are timed at the cheapest setting that meets the target; power iterations
  (PyHessian, hessian-eigenthings) are run once with their stopping test disabled and
  every product time-stamped, so their time is the moment they first reach the target
  (an oracle stop, which favours them);
* **trace**: Hutchinson with 100 Rademacher probes in every library (the same
  estimator, so the same accuracy in distribution), plus hvp's Hutch++ / XTrace at
  the same budget;
* **density**: stochastic Lanczos quadrature, one probe, 90 Lanczos steps (PyHessian
  needs a ``torch.eig`` shim), with its Wasserstein-1 distance to the exact spectrum
  where that is known.

Peers are optional (``pip install hvp-jax[bench-peers]``); a missing one is reported
as such and skipped.
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import hvp
from benchmarks import _common as C
from benchmarks import _models as M
from benchmarks import peers_torch as PT
from hvp import tree as tu

GROUP = "peers"
TITLE = "hvp vs PyHessian, hessian-eigenthings and matfree (tanh MLP on the digits, float32)"

FULL_WIDTHS = (32, 128, 512, 1024)
QUICK_WIDTHS = (8,)
TOP1_TARGET = 1e-4  # |lambda - lambda*| / |lambda*|
TOP5_TARGET = 1e-3  # max_i |lambda_i - lambda_i*| / |lambda_1*|
TRACE_PROBES = 100
SLQ_ITERS = 90
DENSE_REF_MAX_N = 10_000
LANCZOS_GRID = (6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)
TOL_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
PYH_TOL_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
TORCH_POWER_TOP5_MAX_N = 400_000


def _peers_status() -> dict:
    """Which peers are importable. ``HVP_BENCH_HIDE_PEERS=all`` (or a comma list) treats them as absent."""
    import os

    hidden = {h.strip() for h in os.environ.get("HVP_BENCH_HIDE_PEERS", "").split(",") if h.strip()}
    st = {}
    for name in ("torch", "pyhessian", "hessian_eigenthings", "matfree"):
        ok = PT.available(name) and not ({"all", name} & hidden)
        st[name] = {"installed": ok, "version": PT.version(name) if ok else None}
    return st


def _rel(a, b):
    return float(abs(a - b) / abs(b))


def _top5_err(vals, ref5):
    vals = np.sort(np.asarray(vals, np.float64))[-5:]
    return float(np.max(np.abs(vals - ref5)) / abs(ref5[-1]))


class _Reached(Exception):
    """Raised by :class:`_Stamped` once the target has held for ``patience`` products."""


class _Stamped:
    """Wraps a matvec: time-stamps every product and records the Rayleigh quotient ``v.Av``.

    Once the Rayleigh quotient has been within ``target`` of ``ref`` for ``patience``
    consecutive products it raises :class:`_Reached`, ending the run early (the
    time-to-target is read from the stamps, so this only saves benchmark time).
    """

    def __init__(self, fn, dot, ref=None, target=None, patience=3):
        self.fn, self.dot = fn, dot
        self.ref, self.target, self.patience = ref, target, patience
        self.t0 = time.perf_counter()
        self.stamps, self.rayleigh = [], []

    def __call__(self, *args):
        out = self.fn(*args)
        self.rayleigh.append(self.dot(args, out))
        self.stamps.append(time.perf_counter() - self.t0)
        if self.ref is not None and len(self.rayleigh) >= self.patience:
            last = np.abs(np.asarray(self.rayleigh[-self.patience :]) - self.ref) / abs(self.ref)
            if np.all(last <= self.target):
                raise _Reached()
        return out

    def time_to(self, ref, target):
        errs = np.abs(np.asarray(self.rayleigh) - ref) / abs(ref)
        ok = errs <= target
        for i in range(len(ok)):
            if ok[i:].all():
                return {
                    "time_s": self.stamps[i],
                    "matvecs": i + 1,
                    "error": float(errs[i]),
                    "reached": True,
                }
        return {
            "time_s": self.stamps[-1] if self.stamps else None,
            "matvecs": len(self.stamps),
            "error": float(errs[-1]) if len(errs) else None,
            "reached": False,
        }


def _sweep(configs, run_once, error_of, target, *, time_budget):
    """First config whose result meets ``target``: ``run_once(cfg) -> (result, seconds)``."""
    last = None
    spent = 0.0
    for cfg in configs:
        res, secs = run_once(cfg)
        err = error_of(res)
        spent += secs
        last = {
            "config": cfg,
            "error": err,
            "time_s": secs,
            "reached": err <= target,
            "result": res,
        }
        if err <= target:
            return last
        if spent > time_budget:
            last["note"] = f"sweep stopped after {spent:.0f} s"
            break
    if last is not None:
        last["reached"] = False
    return last


# ------------------------------------------------------------------------------------------------
def _reference(width, num_examples, quick):
    """Float64 reference eigenvalues (all of them for small n, else the top 5)."""
    jax.config.update("jax_enable_x64", True)
    try:
        params, loss_fn, batch = M.mlp(width, dtype=jnp.float64, num_examples=num_examples)
        op = hvp.hessian(loss_fn, params, batch, check_finite=False)
        n = op.size
        t0 = time.perf_counter()
        if n <= DENSE_REF_MAX_N:
            H = np.asarray(op.dense(max_size=None, chunk_size=128))
            eigs = np.linalg.eigvalsh((H + H.T) / 2)
            ref = {
                "kind": "dense float64 eigh",
                "eigenvalues": eigs,
                "top5": eigs[-5:],
                "trace": float(np.trace(H)),
            }
        else:
            res = C.algorithm("eigsh")(
                op, k=5, key=jax.random.PRNGKey(7), tol=1e-9, max_restarts=60
            )
            top5 = np.sort(np.asarray(res.eigenvalues))
            ref = {
                "kind": "hvp.eigsh float64, tol 1e-9",
                "eigenvalues": None,
                "top5": top5,
                "trace": None,
                "max_residual": float(np.max(np.asarray(res.residuals))),
                "converged": bool(np.all(np.asarray(res.converged))),
            }
        ref["seconds"] = time.perf_counter() - t0
        return ref
    finally:
        jax.config.update("jax_enable_x64", False)


def _ours(op, v0, ref, quick, reps):
    eigsh = C.algorithm("eigsh")
    power = C.algorithm("power_iteration")
    trace = C.algorithm("trace")
    sd = C.algorithm("spectral_density")
    key = jax.random.PRNGKey(0)
    out = {}
    top1, top5 = ref["top5"][-1], ref["top5"]

    def timed(fn):
        t = C.time_fn(fn, repeats=reps, warmup=1)
        return t.pop("value"), t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)

        tasks = [
            ("top1", 1, TOP1_TARGET, lambda r: _rel(float(r.eigenvalues[-1]), top1)),
            ("top5", 5, TOP5_TARGET, lambda r: _top5_err(r.eigenvalues, top5)),
        ]
        for label, k, target, err_of in tasks[:1] if quick else tasks:
            found = None
            for tol in TOL_GRID:
                res = eigsh(op, k=k, key=key, tol=tol)
                err = err_of(res)
                if err <= target:
                    found = tol
                    break
            if found is None:
                out[f"{label}_eigsh"] = {
                    "reached": False,
                    "error": err,
                    "config": f"tol={TOL_GRID[-1]}",
                }
                continue
            res, t = timed(lambda k=k, found=found: eigsh(op, k=k, key=key, tol=found))
            out[f"{label}_eigsh"] = {
                "reached": True,
                "error": err_of(res),
                "config": f"tol={found:g}",
                "matvecs": int(res.num_matvecs),
                "time_s": t["median_s"],
                "timing": t,
            }

        found, spent = None, 0.0
        max_iter = 100 if quick else 1000
        for tol in () if quick else TOL_GRID:
            t0 = time.perf_counter()
            res = power(op, key=key, tol=tol, num_iters=max_iter)
            spent += time.perf_counter() - t0
            if _rel(float(res.eigenvalue), top1) <= TOP1_TARGET:
                found = tol
                break
            if spent > 300:
                break
        if quick:
            pass  # quick mode: eigsh only (each algorithm costs a compilation)
        elif found is not None:
            res, t = timed(lambda: power(op, key=key, tol=found, num_iters=max_iter))
            out["top1_power"] = {
                "reached": True,
                "error": _rel(float(res.eigenvalue), top1),
                "config": f"tol={found:g}",
                "matvecs": int(res.num_matvecs),
                "time_s": t["median_s"],
                "timing": t,
            }
        else:
            out["top1_power"] = {
                "reached": False,
                "error": _rel(float(res.eigenvalue), top1),
                "config": f"tol swept to {tol:g}, at most {max_iter} iterations",
            }

    for method in ("hutchinson",) if quick else ("hutchinson", "hutch++", "xtrace"):
        res, t = timed(
            lambda method=method: trace(op, key=key, num_matvecs=TRACE_PROBES, method=method)
        )
        d = {
            "estimate": float(res.estimate),
            "std_error": float(res.std_error),
            "time_s": t["median_s"],
            "timing": t,
            "matvecs": int(res.num_matvecs),
        }
        if ref["trace"] is not None:
            d["error"] = _rel(float(res.estimate), ref["trace"])
        out[f"trace_{method}"] = d

    res, t = timed(lambda: sd(op, key=key, num_probes=1, num_iters=SLQ_ITERS))
    d = {"time_s": t["median_s"], "timing": t, "matvecs": int(res.num_matvecs)}
    if ref["eigenvalues"] is not None:
        d["w1_rel"] = _w1(
            np.asarray(res.nodes).ravel(), np.asarray(res.weights).ravel(), ref["eigenvalues"]
        )
    out["density"] = d
    return out


def _w1(nodes, weights, eigs):
    w1 = C.algorithm("wasserstein1")
    return float(w1(nodes, weights, eigs) / (eigs.max() - eigs.min()))


# ------------------------------------------------------------------------------------------------
def _matfree(op, v0, ref, reps):
    from matfree import decomp, eig, stochtrace

    out = {}
    top1, top5 = ref["top5"][-1], ref["top5"]

    def matvec(v, op):
        return op.mv(v)

    cache = {}

    def lanczos_fn(m):
        if m not in cache:
            cache[m] = jax.jit(
                lambda v, op: eig.eigh_partial(decomp.tridiag_sym(m))(matvec, v, op)[0]
            )
        return cache[m]

    for label, target, err_of in (
        ("top1", TOP1_TARGET, lambda vals: _rel(float(np.max(vals)), top1)),
        ("top5", TOP5_TARGET, lambda vals: _top5_err(vals, top5)),
    ):

        def run_once(m):
            f = lanczos_fn(m)
            jax.block_until_ready(f(v0, op))
            t = C.time_fn(lambda: f(v0, op), repeats=reps, warmup=0)
            return t.pop("value"), t["median_s"]

        s = _sweep(
            [m for m in LANCZOS_GRID if m <= op.size],
            run_once,
            lambda v, err_of=err_of: err_of(np.asarray(v)),
            target,
            time_budget=600,
        )
        s.pop("result")
        s["matvecs"] = s.pop("config")
        s["config"] = f"{s['matvecs']} Lanczos steps"
        out[f"{label}_lanczos"] = s

    sampler = stochtrace.sampler_signs(op.like, num=TRACE_PROBES)
    est = stochtrace.estimator_monte_carlo(stochtrace.monte_carlo_trace(), sampler)
    ftr = jax.jit(lambda k, op: est(matvec, k, op))
    t = C.time_fn(lambda: ftr(jax.random.PRNGKey(0), op), repeats=reps, warmup=1)
    d = {
        "estimate": float(t.pop("value")),
        "time_s": t["median_s"],
        "timing": t,
        "matvecs": TRACE_PROBES,
    }
    if ref["trace"] is not None:
        d["error"] = _rel(d["estimate"], ref["trace"])
    out["trace_hutchinson"] = d

    tri = decomp.tridiag_sym(SLQ_ITERS)
    like = op.like

    def slq(k, op):
        z = tu.rademacher_like(k, like)
        z = tu.scale(1.0 / tu.norm(z), z)
        _, (T), *_ = tri(lambda v, op: tu.ravel(op.mv(tu.unravel_fn(like)(v))), tu.ravel(z), op)
        w, s = jnp.linalg.eigh(T)
        return w, s[0] ** 2

    fslq = jax.jit(slq)
    t = C.time_fn(lambda: fslq(jax.random.PRNGKey(0), op), repeats=reps, warmup=1)
    nodes, weights = t.pop("value")
    d = {"time_s": t["median_s"], "timing": t, "matvecs": SLQ_ITERS}
    if ref["eigenvalues"] is not None:
        d["w1_rel"] = _w1(np.asarray(nodes), np.asarray(weights), ref["eigenvalues"])
    out["density"] = d
    return out


# ------------------------------------------------------------------------------------------------
def _torch_problem(width, num_examples):
    import torch

    layers = M.mlp_params_np(width)
    x, y = M._digits_np()
    if num_examples is not None:
        x, y = x[:num_examples], y[:num_examples]
    model, crit, batch = PT.build(layers, x, y)
    torch.manual_seed(0)
    return model, crit, batch


def _agreement(width, num_examples, params, loss_fn, batch, op):
    """Loss and one HVP, PyTorch vs JAX (float32)."""
    import torch

    model, crit, tb = _torch_problem(width, num_examples)
    v = tu.normal_like(jax.random.PRNGKey(3), params)
    hv = op @ v
    tv = PT.to_torch_vector(model, v)
    thv = PT.hvp(model, crit, tb, tv)
    jax_flat, torch_flat = [], []
    for layer_j, (tw, tb_) in zip(hv, zip(thv[0::2], thv[1::2])):
        jax_flat += [np.asarray(layer_j["w"]).T.ravel(), np.asarray(layer_j["b"]).ravel()]
        torch_flat += [tw.detach().numpy().ravel(), tb_.detach().numpy().ravel()]
    a, b = np.concatenate(jax_flat), np.concatenate(torch_flat)
    with torch.no_grad():
        tloss = float(crit(model(tb[0]), tb[1]))
    jloss = float(loss_fn(params, batch))
    return {
        "loss_jax": jloss,
        "loss_torch": tloss,
        "loss_rel_diff": abs(jloss - tloss) / abs(jloss),
        "hvp_rel_diff": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
    }


def _pyhessian(width, num_examples, ref, reps, quick):
    import sys

    import pyhessian  # noqa: F401
    import torch
    from pyhessian import hessian as pyh_hessian

    pyh_mod = sys.modules[
        "pyhessian.hessian"
    ]  # the module (the package re-exports the class by that name)
    from pyhessian.utils import group_product

    PT.shim_torch_eig()
    model, crit, batch = _torch_problem(width, num_examples)
    t0 = time.perf_counter()
    H = pyh_hessian(model, crit, data=batch, cuda=False)
    setup = time.perf_counter() - t0
    out = {"setup_s": setup}
    top1, top5 = ref["top5"][-1], ref["top5"]
    original = pyh_mod.hessian_vector_product
    max_iter = 100 if quick else 1000

    # top-1: one run, stopping test off, every product stamped
    stamped = _Stamped(
        original, lambda args, hv: float(group_product(hv, args[2]).item()), top1, TOP1_TARGET
    )
    pyh_mod.hessian_vector_product = stamped
    try:
        torch.manual_seed(0)
        stamped.t0 = time.perf_counter()
        H.eigenvalues(maxIter=max_iter, tol=0.0, top_n=1)
    except _Reached:
        pass
    finally:
        pyh_mod.hessian_vector_product = original
    out["top1_power"] = {
        **stamped.time_to(top1, TOP1_TARGET),
        "config": "power iteration, oracle stop",
    }

    # top-5: deflated power iteration; its own tol swept (each run timed whole)
    def run_once(tol):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        vals, _ = H.eigenvalues(maxIter=max_iter, tol=tol, top_n=5)
        return vals, time.perf_counter() - t0

    if H.params and sum(p.numel() for p in H.params) > TORCH_POWER_TOP5_MAX_N:
        out["top5_power"] = {
            "reached": False,
            "skipped": True,
            "config": f"skipped above n = {TORCH_POWER_TOP5_MAX_N:,} (deflated power "
            "iteration runs minutes per setting there)",
        }
    else:
        s = _sweep(
            PYH_TOL_GRID,
            run_once,
            lambda v: _top5_err(v, top5),
            TOP5_TARGET,
            time_budget=60 if quick else 150,
        )
        s.pop("result")
        s["config"] = f"deflated power iteration, tol={s['config']:g}"
        out["top5_power"] = s

    def tr():
        torch.manual_seed(0)
        # tol=-inf: PyHessian stops when |mean - previous| / (previous + 1e-6) < tol, which a negative
        # running mean satisfies for any tol >= 0; -inf makes it take all the probes.
        samples = H.trace(maxIter=TRACE_PROBES, tol=float("-inf"))
        assert len(samples) == TRACE_PROBES, len(samples)
        return float(np.mean(samples))

    t = C.time_fn(tr, repeats=reps, warmup=0)
    d = {"estimate": t.pop("value"), "time_s": t["median_s"], "timing": t, "matvecs": TRACE_PROBES}
    if ref["trace"] is not None:
        d["error"] = _rel(d["estimate"], ref["trace"])
    out["trace_hutchinson"] = d

    def dens():
        torch.manual_seed(0)
        return H.density(iter=SLQ_ITERS, n_v=1)

    t = C.time_fn(dens, repeats=reps, warmup=0)
    nodes, weights = t.pop("value")
    d = {"time_s": t["median_s"], "timing": t, "matvecs": SLQ_ITERS}
    if ref["eigenvalues"] is not None:
        d["w1_rel"] = _w1(np.asarray(nodes[0]), np.asarray(weights[0]), ref["eigenvalues"])
    out["density"] = d
    return out


def _eigenthings(width, num_examples, ref, reps, quick):
    import hessian_eigenthings as he
    import torch

    model, crit, batch = _torch_problem(width, num_examples)
    op = he.HessianOperator(model, [batch], he.supervised_loss(crit), full_dataset=True)
    out = {}
    top1, top5 = ref["top5"][-1], ref["top5"]
    max_iter = 100 if quick else 1000

    original = op.matvec
    stamped = _Stamped(original, lambda args, av: float(torch.dot(args[0], av)), top1, TOP1_TARGET)
    op.matvec = stamped
    try:
        stamped.t0 = time.perf_counter()
        he.power_iteration_one(op, max_iter=max_iter, tol=0.0, seed=0)
    except _Reached:
        pass
    finally:
        op.matvec = original
    out["top1_power"] = {
        **stamped.time_to(top1, TOP1_TARGET),
        "config": "power iteration, oracle stop",
    }

    for label, k, target, err_of in (
        ("top1", 1, TOP1_TARGET, lambda r: _rel(float(r.eigenvalues.max()), top1)),
        ("top5", 5, TOP5_TARGET, lambda r: _top5_err(r.eigenvalues.numpy(), top5)),
    ):

        def run_once(m, k=k):
            t = C.time_fn(
                lambda: he.lanczos(op, k=k, max_iter=m, which="LA", reorthogonalize=True, seed=0),
                repeats=reps,
                warmup=0,
            )
            return t.pop("value"), t["median_s"]

        s = _sweep(
            [m for m in LANCZOS_GRID if k <= m < op.size],
            run_once,
            err_of,
            target,
            time_budget=120 if quick else 600,
        )
        s.pop("result")
        s["matvecs"] = s.pop("config")
        s["config"] = f"lanczos, {s['matvecs']} steps"
        out[f"{label}_lanczos"] = s

    t = C.time_fn(
        lambda: he.hutchinson(op, num_samples=TRACE_PROBES, seed=0), repeats=reps, warmup=0
    )
    res = t.pop("value")
    d = {
        "estimate": float(res.estimate),
        "time_s": t["median_s"],
        "timing": t,
        "matvecs": TRACE_PROBES,
    }
    if ref["trace"] is not None:
        d["error"] = _rel(d["estimate"], ref["trace"])
    out["trace_hutchinson"] = d

    t = C.time_fn(
        lambda: he.spectral_density(
            op, num_runs=1, lanczos_steps=SLQ_ITERS, num_grid_points=100, seed=0
        ),
        repeats=reps,
        warmup=0,
    )
    res = t.pop("value")
    d = {"time_s": t["median_s"], "timing": t, "matvecs": SLQ_ITERS}
    if ref["eigenvalues"] is not None:
        nodes = getattr(res, "nodes", None)
        weights = getattr(res, "weights", None)
        if nodes is not None and weights is not None:
            d["w1_rel"] = _w1(
                np.asarray(nodes).ravel(), np.asarray(weights).ravel(), ref["eigenvalues"]
            )
    out["density"] = d
    return out


# ------------------------------------------------------------------------------------------------
def bench_size(width, *, quick, status):
    num_examples = 256 if quick else None
    params, loss_fn, batch = M.mlp(width, num_examples=num_examples)
    n = M.num_params(params)
    reps = 1 if (quick or n > 200_000) else 3
    row = {"width": width, "n": n, "num_examples": int(batch[0].shape[0])}

    # our operator: the faster of forward-over-reverse and linearize-once
    ops = {
        "default": hvp.hessian(loss_fn, params, batch, check_finite=False),
        "linearize": hvp.hessian(loss_fn, params, batch, check_finite=False, linearize=True),
    }
    v = tu.rademacher_like(jax.random.PRNGKey(1), params)
    one = {
        k: C.time_fn(lambda o=o: o @ v, repeats=5, warmup=2, min_time=0.3)["median_s"]
        for k, o in ops.items()
    }
    choice = min(one, key=one.get)
    op = ops[choice]
    row["hvp_one_s"] = one
    row["hvp_mode"] = choice
    row["reference"] = ref = _reference(width, num_examples, quick)
    print(
        f"  n={n:,}: reference ({ref['kind']}) in {ref['seconds']:.1f} s; our HVP {choice} "
        f"{C.fmt_s(one[choice])}",
        flush=True,
    )
    row["hvp"] = _ours(op, v, ref, quick, reps)
    if status["matfree"]["installed"]:
        row["matfree"] = _matfree(op, v, ref, reps)
    if status["torch"]["installed"]:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", message=".*create_graph=True.*")
        row["agreement"] = _agreement(width, num_examples, params, loss_fn, batch, op)
        if status["pyhessian"]["installed"]:
            row["pyhessian"] = _pyhessian(width, num_examples, ref, reps, quick)
        if status["hessian_eigenthings"]["installed"]:
            row["eigenthings"] = _eigenthings(width, num_examples, ref, reps, quick)
    ref = dict(ref)
    if ref.get("eigenvalues") is not None:
        eigs = ref["eigenvalues"]
        ref["eigenvalues_summary"] = {
            "min": float(eigs.min()),
            "max": float(eigs.max()),
            "n": int(eigs.size),
        }
        ref["eigenvalues"] = None
    ref["top5"] = np.asarray(ref["top5"]).tolist()
    row["reference"] = ref
    return row


TASKS = [
    ("top eigenvalue", "top1"),
    ("top-5 eigenvalues", "top5"),
    (f"trace ({TRACE_PROBES} Hutchinson probes)", "trace"),
    (f"density (SLQ, {SLQ_ITERS} steps)", "density"),
]


def _best(lib: dict | None, task: str):
    """The fastest entry of a library for a task that reached the target."""
    if not lib:
        return None
    if task in ("top1", "top5"):
        cands = [v for k, v in lib.items() if k.startswith(task + "_") and isinstance(v, dict)]
        cands = [c for c in cands if c.get("reached") and c.get("time_s") is not None]
        return min(cands, key=lambda c: c["time_s"]) if cands else None
    if task == "trace":
        return lib.get("trace_hutchinson")
    return lib.get("density")


def run(out_dir, *, quick: bool = False) -> C.Report:
    rep = C.Report(GROUP, TITLE, out_dir, quick=quick)
    rep.data["environment"] = C.environment()
    status = _peers_status()
    rep.data["peers"] = status
    missing = [k for k, v in status.items() if not v["installed"]]
    if missing:
        msg = (
            f"Not installed, skipped: {', '.join(missing)} (install the optional peers with "
            f"`pip install torch==2.13.0` and `pip install --no-deps pyhessian hessian-eigenthings matfree`, "
            f"or the `bench-peers` extra)."
        )
        print("  " + msg, flush=True)
        rep.notes.append(msg)
    if not status["torch"]["installed"]:
        for k in ("pyhessian", "hessian_eigenthings"):
            status[k]["installed"] = False
    widths = QUICK_WIDTHS if quick else FULL_WIDTHS
    rep.data["settings"] = {
        "widths": list(widths),
        "top1_target": TOP1_TARGET,
        "top5_target": TOP5_TARGET,
        "trace_probes": TRACE_PROBES,
        "slq_iters": SLQ_ITERS,
        "lanczos_grid": list(LANCZOS_GRID),
        "tol_grid": list(TOL_GRID),
    }
    rows = []
    for width in C.progress(widths, description="peers"):
        rows.append(bench_size(width, quick=quick, status=status))
    rep.data["rows"] = rows

    libs = [
        ("hvp", "hvp"),
        ("matfree", "matfree"),
        ("PyHessian", "pyhessian"),
        ("hessian-eigenthings", "eigenthings"),
    ]
    table, ratios = [], []
    for r in rows:
        for title, task in TASKS:
            cells = [f"{r['n']:,}", title]
            ours = _best(r.get("hvp"), task)
            for lname, lkey in libs:
                if lkey != "hvp" and lkey not in r:
                    cells.append(
                        "not installed"
                        if not status.get(
                            {"pyhessian": "pyhessian", "eigenthings": "hessian_eigenthings"}.get(
                                lkey, lkey
                            ),
                            {},
                        ).get("installed")
                        else "-"
                    )
                    continue
                b = _best(r.get(lkey), task)
                if b is None:
                    entry = {
                        k: v for k, v in (r.get(lkey) or {}).items() if k.startswith(task + "_")
                    }
                    cells.append("target not reached" if entry else "-")
                    continue
                err = b.get("error", b.get("w1_rel"))
                extra = f", err {err:.0e}" if err is not None else ""
                mv = f"{b['matvecs']} mv" if b.get("matvecs") is not None else b.get("config", "")
                cells.append(f"{C.fmt_s(b['time_s'])} ({mv}{extra})")
                if lkey != "hvp" and ours is not None:
                    ratios.append(
                        {
                            "n": r["n"],
                            "task": task,
                            "peer": lname,
                            "ratio_peer_over_hvp": b["time_s"] / ours["time_s"],
                        }
                    )
            table.append(cells)
    rep.table(
        "Time to the same accuracy (mv = matvecs; err = relative error vs the reference, or W1/range "
        "for the density)",
        ["n", "task"] + [name for name, _ in libs],
        table,
        note=f"Targets: top eigenvalue relative error <= {TOP1_TARGET:g}; top-5: max error <= "
        f"{TOP5_TARGET:g} x lambda_1. hvp: the fastest of `eigsh` and `power_iteration` (tol swept). "
        "Lanczos peers: fewest steps on the grid that reach the target; power iterations: "
        "oracle stop at the first product whose Rayleigh quotient is within the target.",
    )
    rep.data["ratios"] = ratios
    if ratios:
        rrows = []
        for peer in sorted({x["peer"] for x in ratios}):
            for task in ("top1", "top5", "trace", "density"):
                vals = [x for x in ratios if x["peer"] == peer and x["task"] == task]
                if vals:
                    rrows.append(
                        [peer, task]
                        + [
                            ", ".join(
                                f"n={x['n']:,}: {x['ratio_peer_over_hvp']:.1f}x" for x in vals
                            )
                        ]
                    )
        rep.table(
            "Speed ratios: peer time / hvp time at matched accuracy (> 1: hvp faster)",
            ["peer", "task", "ratios"],
            rrows,
        )
        slower = [x for x in ratios if x["ratio_peer_over_hvp"] < 1.0]
        rep.data["summary"] = {
            "hvp_faster_everywhere": not slower,
            "cases_where_peer_faster": slower,
            "min_ratio": min(x["ratio_peer_over_hvp"] for x in ratios),
            "median_ratio": float(np.median([x["ratio_peer_over_hvp"] for x in ratios])),
        }
    arows = [
        [
            f"{r['n']:,}",
            f"{r['agreement']['loss_rel_diff']:.1e}",
            f"{r['agreement']['hvp_rel_diff']:.1e}",
        ]
        for r in rows
        if "agreement" in r
    ]
    if arows:
        rep.table(
            "PyTorch vs JAX model agreement (float32)",
            ["n", "loss rel. diff", "HVP rel. diff"],
            arows,
        )
    hrows = [
        [
            f"{r['n']:,}",
            r["hvp_mode"],
            C.fmt_s(r["hvp_one_s"]["default"]),
            C.fmt_s(r["hvp_one_s"]["linearize"]),
            r["reference"]["kind"],
        ]
        for r in rows
    ]
    rep.table(
        "Our operator and the reference",
        ["n", "HVP mode used", "one HVP (default)", "one HVP (linearize=True)", "reference"],
        hrows,
    )

    colors = {"hvp": "C0", "matfree": "C1", "pyhessian": "C2", "eigenthings": "C3"}

    def draw(fig):
        for j, (title, task) in enumerate(TASKS):
            ax = fig.add_subplot(1, len(TASKS), j + 1)
            for lname, lkey in libs:
                xs, ys = [], []
                for r in rows:
                    b = _best(r.get(lkey), task)
                    if b is not None:
                        xs.append(r["n"]), ys.append(b["time_s"])
                if xs:
                    ax.loglog(xs, ys, "o-", label=lname, color=colors[lkey])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("parameters n")
            if j == 0:
                ax.set_ylabel("seconds (matched accuracy)")
            ax.legend(fontsize=7)
        fig.suptitle(f"hvp vs peers, tanh MLP on digits, float32, {C.device_name()}")

    rep.figure("peers.png", draw, figsize=(13, 4))
    return rep
