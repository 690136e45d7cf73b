"""The benchmark MLP in PyTorch, with the JAX model's exact weights and data.

Used by :mod:`benchmarks.bench_peers` to run PyHessian and hessian-eigenthings on
the same problem as hvp. Imports ``torch`` lazily: :func:`available` says whether
it (and each peer package) is installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np


def available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def version(name: str) -> str | None:
    try:
        from importlib.metadata import version as v

        return v(
            {"pyhessian": "pyhessian", "hessian_eigenthings": "hessian-eigenthings"}.get(name, name)
        )
    except Exception:
        return None


def build(layers_np, x_np, y_np, *, threads: int | None = None):
    """``(model, criterion, (x, y))``: the tanh MLP in float32 with the given weights.

    ``layers_np`` is :func:`benchmarks._models.mlp_params_np` (``w`` is ``(in, out)``;
    ``torch.nn.Linear`` stores ``(out, in)``, so it is transposed).
    """
    import torch
    from torch import nn

    if threads:
        torch.set_num_threads(threads)
    mods = []
    for i, layer in enumerate(layers_np):
        lin = nn.Linear(layer["w"].shape[0], layer["w"].shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(np.asarray(layer["w"]).T, dtype=torch.float32))
            lin.bias.copy_(torch.as_tensor(np.array(layer["b"]), dtype=torch.float32))
        mods.append(lin)
        if i < len(layers_np) - 1:
            mods.append(nn.Tanh())
    model = nn.Sequential(*mods).eval()
    x = torch.as_tensor(np.array(x_np), dtype=torch.float32)
    y = torch.as_tensor(np.array(y_np), dtype=torch.long)
    return model, nn.CrossEntropyLoss(), (x, y)


def to_torch_vector(model, tree_layers):
    """A JAX-layout layer list (``[{"w", "b"}, ...]``) as the list of tensors matching ``model.parameters()``."""
    import torch

    out = []
    for layer in tree_layers:
        out.append(torch.as_tensor(np.asarray(layer["w"]).T.copy(), dtype=torch.float32))
        out.append(torch.as_tensor(np.array(layer["b"]), dtype=torch.float32))
    return out


def hvp(model, criterion, batch, vs):
    """Plain double-backward HVP in PyTorch (for the agreement check)."""
    import torch

    params = [p for p in model.parameters()]
    x, y = batch
    loss = criterion(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=vs)


def shim_torch_eig() -> None:
    """PyHessian 0.1 calls ``torch.eig`` (removed from PyTorch): provide it for symmetric inputs.

    ``torch.eig(T, eigenvectors=True)`` returned ``(eigenvalues (n, 2) [real, imag], eigenvectors)``;
    PyHessian only applies it to its symmetric tridiagonal matrix, so ``torch.linalg.eigh`` serves.
    """
    import torch

    if getattr(torch.eig, "_hvp_shim", False) if hasattr(torch, "eig") else False:
        return

    def eig(a, eigenvectors=False):
        w, v = torch.linalg.eigh(a)
        return torch.stack([w, torch.zeros_like(w)], dim=1), (v if eigenvectors else torch.empty(0))

    eig._hvp_shim = True
    torch.eig = eig  # modern PyTorch keeps a stub that raises; replace it


def build_lm(config: dict | None = None, *, threads: int | None = None):
    """``(model, criterion, (inputs, targets))``: the PyTorch twin of :func:`benchmarks._models.nnx_lm`.

    Same weights (:func:`benchmarks._arrays.lm_params_np`, float32, kept in JAX's layout:
    ``x @ kernel + bias``), same computation (pre-norm blocks, causal softmax attention with
    the masked scores set to the dtype's minimum, exact GELU, LayerNorm epsilon 1e-5).
    ``model(inputs)`` returns the logits flattened to ``(B * T, V)`` and ``targets`` is
    ``(B * T,)``, so PyHessian's and hessian-eigenthings' ``criterion(model(x), y)`` is the mean
    next-token cross-entropy. ``model.parameters()`` are in JAX's flattening order of the
    parameter dict (:func:`benchmarks._arrays.flatten`), each with the JAX leaf's shape.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    from benchmarks._arrays import LM_CONFIG, flatten, lm_params_np, lm_tokens_np

    if threads:
        torch.set_num_threads(threads)
    cfg = {**LM_CONFIG, **(config or {})}
    d, heads = cfg["d_model"], cfg["heads"]
    hd = d // heads
    leaves = flatten(lm_params_np(**cfg))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = nn.ParameterList(
                [nn.Parameter(torch.as_tensor(a, dtype=torch.float32)) for _, a in leaves]
            )
            self.index = {path: i for i, (path, _) in enumerate(leaves)}

        def p(self, *path):
            return self.flat[self.index[path]]

        def linear(self, x, *path):
            return x @ self.p(*path, "kernel") + self.p(*path, "bias")

        def norm(self, x, *path):
            return F.layer_norm(x, (d,), self.p(*path, "scale"), self.p(*path, "bias"), eps=1e-5)

        def forward(self, tokens):
            b, t = tokens.shape
            h = self.p("embed", "embedding")[tokens] + self.p("pos")[:t][None]
            causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
            for i in range(cfg["layers"]):
                x = self.norm(h, "blocks", i, "ln1")
                q, k, v = (
                    self.linear(x, "blocks", i, "attn", name).reshape(b, t, heads, hd)
                    for name in ("query", "key", "value")
                )
                s = torch.einsum("bqhd,bkhd->bhqk", q, k) / float(np.sqrt(hd))
                s = s.masked_fill(~causal, torch.finfo(s.dtype).min)
                a = torch.softmax(s, dim=-1)
                o = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d)
                h = h + self.linear(o, "blocks", i, "attn", "out")
                x = self.norm(h, "blocks", i, "ln2")
                h = h + self.linear(F.gelu(self.linear(x, "blocks", i, "fc1")), "blocks", i, "fc2")
            logits = self.linear(self.norm(h, "ln_f"), "head")
            return logits.reshape(b * t, -1)

    tokens = torch.as_tensor(lm_tokens_np(**cfg), dtype=torch.long)
    return LM().eval(), nn.CrossEntropyLoss(), (tokens[:, :-1], tokens[:, 1:].reshape(-1))
