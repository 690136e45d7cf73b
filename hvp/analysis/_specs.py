"""Model specs: ``module.path:factory`` or ``path/to/file.py:factory``.

A *model spec* names a factory, a Python callable taking no arguments, that
returns ``(model, loss)``:

* ``model`` is either a Flax NNX module (an ``nnx.Module`` instance; its
  variables are replaced by the checkpoint's), or a Linen pair
  ``(linen_module, example_variables)`` where ``example_variables`` is the
  dict that ``linen_module.init(...)`` returns (``{"params": ..., "batch_stats":
  ...}``; only its structure, shapes and dtypes matter, the values are replaced
  by the checkpoint's), or a Linen triple ``(linen_module, example_variables,
  apply_kwargs)`` with keyword arguments for ``module.apply`` (e.g.
  ``{"train": False}``);
* ``loss`` is a loss on the model's outputs, ``loss(outputs, targets) -> scalar``
  (a mean over the examples of a batch), or one of the strings
  ``"cross_entropy"`` (:data:`hvp.losses.softmax_cross_entropy`, integer labels
  or one-hot targets) and ``"mse"`` (:data:`hvp.losses.mean_squared_error`).

The part before the last ``:`` is a module path importable from the current
directory or ``sys.path`` (``mypkg.models``), or the path of a Python file
(``models/mlp.py``); the part after it is the factory's name (dotted names
such as ``Models.small`` are followed attribute by attribute).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvp.analysis._errors import AnalysisError

__all__ = ["ModelSpec", "resolve_callable", "load_model", "LOSS_NAMES"]

#: Loss names accepted in a model factory's return value.
LOSS_NAMES = ("cross_entropy", "mse")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model built from a spec.

    Attributes:
      kind: ``"nnx"`` or ``"linen"``.
      model: the NNX module, or the Linen module.
      variables: the Linen example variables (``None`` for NNX).
      apply_kwargs: keyword arguments of ``module.apply`` (Linen; ``None`` for NNX).
      loss: the loss on outputs (a callable or one of :data:`LOSS_NAMES`).
      spec: the spec string it was built from (or a description of the callable).

    Examples:
        >>> import hvp
        >>> spec = hvp.analysis.load_model(hvp.analysis.DEMO_MODEL_SPEC)
        >>> spec.kind, spec.loss, spec.spec == hvp.analysis.DEMO_MODEL_SPEC
        ('nnx', 'cross_entropy', True)
    """

    kind: str
    model: Any
    variables: Any
    loss: Any
    spec: str
    apply_kwargs: Any = None


def _import_file(path: Path, what: str):
    if not path.is_file():
        raise AnalysisError(f"{what}: the file '{path}' does not exist.")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_hvp_spec_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AnalysisError(f"{what}: cannot load '{path}' as a Python file (it must end in .py).")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise AnalysisError(f"{what}: importing '{path}' failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(name: str, what: str):
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # the console script does not put the working directory on sys.path
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise AnalysisError(
                f"{what}: cannot import module '{name}' (no module named '{e.name}'). Run from the "
                "directory that contains it, add it to PYTHONPATH, or give a file path "
                "('path/to/file.py:function')."
            ) from e
        raise AnalysisError(f"{what}: importing '{name}' failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise AnalysisError(f"{what}: importing '{name}' failed: {type(e).__name__}: {e}") from e
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def resolve_callable(spec: str, *, what: str = "model spec") -> Callable:
    """The callable named by ``"module.path:name"`` or ``"path/to/file.py:name"``.

    Raises:
      AnalysisError: malformed spec, module or file not found, import failure,
        missing attribute, or not callable (each message names the fix).

    Examples:
        >>> import hvp
        >>> hvp.analysis.resolve_callable("hvp.analysis:digits_mlp") is hvp.analysis.digits_mlp
        True
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise AnalysisError(
            f"{what} {spec!r} must look like 'module.path:function' or 'path/to/file.py:function'."
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise AnalysisError(
            f"{what} {spec!r} must look like 'module.path:function' or 'path/to/file.py:function'."
        )
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _import_file(Path(target), what)
    else:
        module = _import_module(target, what)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(
                n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))
            )
            shown = ", ".join(names[:15]) + (" ..." if len(names) > 15 else "")
            raise AnalysisError(
                f"{what} {spec!r}: '{target}' has no attribute '{attr}'. Callables it defines: "
                f"{shown or '(none)'}."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise AnalysisError(f"{what} {spec!r}: '{attr}' is a {type(obj).__name__}, not a callable.")
    return obj


def _check_loss(loss, where: str):
    if isinstance(loss, str):
        if loss not in LOSS_NAMES:
            raise AnalysisError(
                f"{where} returned the loss {loss!r}; use one of {', '.join(map(repr, LOSS_NAMES))} or a "
                "callable loss(outputs, targets) -> scalar."
            )
        return loss
    if not callable(loss):
        raise AnalysisError(
            f"{where} returned a loss of type {type(loss).__name__}; it must be a callable "
            f"loss(outputs, targets) -> scalar or one of {', '.join(map(repr, LOSS_NAMES))}."
        )
    return loss


def load_model(spec) -> ModelSpec:
    """Build the model named by a spec (see the module docstring).

    ``spec`` is a spec string, or (from Python) the factory itself or an
    already built ``(model, loss)`` pair.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> import hvp
        >>> def factory():
        ...     net = nn.Dense(2)
        ...     return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"
        >>> spec = hvp.analysis.load_model(factory)  # or a "module:factory" / "file.py:factory" string
        >>> spec.kind, spec.loss
        ('linen', 'mse')
    """
    import flax.linen as nn
    from flax import nnx

    if isinstance(spec, str):
        factory = resolve_callable(spec, what="model spec")
        name = spec
        where = f"The model factory '{spec}'"
        try:
            out = factory()
        except TypeError as e:
            raise AnalysisError(f"{where} must be callable without arguments: {e}") from e
        except AnalysisError:
            raise
        except Exception as e:
            raise AnalysisError(f"{where} raised {type(e).__name__}: {e}") from e
    elif callable(spec):
        name = f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}"
        where = f"The model factory {name}"
        out = spec()
    else:
        name, where, out = "<python object>", "The model", spec

    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise AnalysisError(
            f"{where} must return (model, loss) where model is an nnx.Module or (linen_module, "
            f"example_variables[, apply_kwargs]); it returned {type(out).__name__}."
        )
    model, loss = out
    loss = _check_loss(loss, where)
    if isinstance(model, nnx.Module):
        return ModelSpec(kind="nnx", model=model, variables=None, loss=loss, spec=name)
    if (
        isinstance(model, (tuple, list))
        and len(model) in (2, 3)
        and isinstance(model[0], nn.Module)
    ):
        module, variables = model[0], model[1]
        apply_kwargs = model[2] if len(model) == 3 else None
        if not isinstance(variables, dict) and not hasattr(variables, "keys"):
            raise AnalysisError(
                f"{where} returned a Linen module with example variables of type "
                f"{type(variables).__name__}; pass the dict that `module.init(rng, x)` returns."
            )
        variables = dict(variables)
        if "params" not in variables:
            raise AnalysisError(
                f"{where} returned Linen example variables without a 'params' collection (keys "
                f"{sorted(variables)}); pass the dict that `module.init(rng, x)` returns."
            )
        if apply_kwargs is not None and not isinstance(apply_kwargs, dict):
            raise AnalysisError(
                f"{where} returned Linen apply_kwargs of type {type(apply_kwargs).__name__}; pass a dict such "
                "as {'train': False}."
            )
        return ModelSpec(
            kind="linen",
            model=module,
            variables=variables,
            loss=loss,
            spec=name,
            apply_kwargs=apply_kwargs,
        )
    raise AnalysisError(
        f"{where} returned a model of type {type(model).__name__}; it must be an nnx.Module or a pair "
        "(linen_module, example_variables) (optionally with apply_kwargs as a third element)."
    )
