"""Data specs: where the batches for an analysis come from.

A data spec is one of

* ``"digits"``: the handwritten digits bundled with scikit-learn (1,797 8x8
  images, 10 classes; no download), as ``(x, y)`` with ``x`` of shape
  ``(N, 64)`` scaled to ``[0, 1]`` and integer labels ``y``;
  ``"digits:images"`` gives ``x`` of shape ``(N, 8, 8, 1)`` (NHWC) for
  convolutional models;
* the path of a ``.npz`` file holding the arrays ``x`` and ``y`` (or
  ``inputs`` and ``targets``), with a leading example axis, and optionally
  ``weights`` (per-example or per-token weights, e.g. a padding mask: batches
  become ``(x, y, weights)``), or integer tokens ``inputs`` alone
  (language-model data, read as lm1b batches ``{"inputs": tokens}``: the
  targets are the tokens, the weights the padding mask ``tokens > 0``);
* ``"module.path:function"`` or ``"path/to/file.py:function"``: a function
  called without arguments (or with ``batch_size=`` when it accepts that
  keyword) that returns one batch or an iterable (list, generator) of batches.
  A batch is any pytree of arrays with a leading example axis: ``(inputs,
  targets)``, ``(inputs, targets, weights)``, a dict with keys
  ``inputs``/``targets``, ``x``/``y`` or ``image``/``label`` (optionally
  ``weights``), or ``{"inputs": tokens}`` (see :mod:`hvp.operators._data`).

Targets are checked against the model's outputs (integer labels in ``[0, C)``
at weighted positions, one-hot/probability targets of width ``C``) for every
batch when the curvature operator is built, before any product.

The model is called once on the inputs of the first batch, by shape only
(:func:`check_model_on_data`, before the curvature operator is built): a model
that cannot run on them (a CNN given flat ``digits``) stops the analysis with
the data's shapes, the model's error and the data choices with their shapes.

Arrays (digits, ``.npz``) are cut into consecutive batches of ``batch_size``
examples (the last one may be smaller; the curvature operators weight batches
by size, so the result is the curvature of the mean loss over all the
examples used; weighted batches by their sum of weights). ``num_batches``
keeps only the first batches (of any kind of spec). Floating arrays are cast
to the analysis dtype.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp.analysis._errors import AnalysisError, setting_int
from hvp.analysis._specs import resolve_callable

__all__ = ["LoadedData", "load_data", "digits", "check_model_on_data", "DATA_CHOICES"]

_KEY_PAIRS = (("x", "y"), ("inputs", "targets"))


@dataclasses.dataclass(frozen=True)
class LoadedData:
    """Batches ready for a curvature operator: what :func:`load_data` returns.

    (Named ``DataSet`` before; renamed so as not to be confused with
    :class:`hvp.operators.Dataset`, the operators' description of a data set to iterate over.)

    Attributes:
      batches: list of batches (pytrees of arrays with a leading example axis).
      num_examples: total number of examples over the batches.
      spec: a description of where they came from.

    Examples:
        >>> import hvp
        >>> ds = hvp.analysis.load_data("digits", batch_size=500, num_batches=2)
        >>> ds.num_examples, len(ds.batches), ds.spec
        (1000, 2, 'digits')
    """

    batches: list
    num_examples: int
    spec: str

    @property
    def num_batches(self) -> int:
        return len(self.batches)


def digits(*, images: bool = False, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: ``x`` in ``[0, 1]`` (``(N, 64)``, or ``(N, 8, 8, 1)``), int32 labels.

    Examples:
        >>> import hvp
        >>> x, y = hvp.analysis.digits()
        >>> x.shape, y.shape, x.dtype
        ((1797, 64), (1797,), dtype('float32'))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a test/demo dependency
        raise AnalysisError(
            "The 'digits' data set needs scikit-learn: pip install scikit-learn (or hvp-jax[demo])."
        ) from e
    d = load_digits()
    x = (d.images / 16.0).astype(dtype)
    x = x[..., None] if images else x.reshape(len(x), -1)
    return x, d.target.astype(np.int32)


def _split(arrays, batch_size: int | None, num_batches: int | None) -> list:
    n = len(jax.tree_util.tree_leaves(arrays)[0])
    if n == 0:
        return []
    bs = n if batch_size is None else batch_size
    starts = range(0, n, bs)
    if num_batches is not None:
        starts = list(starts)[:num_batches]
    return [jax.tree_util.tree_map(lambda a, s=s: a[s : s + bs], arrays) for s in starts]


def _load_npz(path: Path):
    if not path.is_file():
        raise AnalysisError(f"The data file '{path}' does not exist.")
    try:
        with np.load(path, allow_pickle=False) as f:
            files = {k: f[k] for k in f.files}
    except Exception as e:
        raise AnalysisError(
            f"Cannot read the data file '{path}' as .npz: {type(e).__name__}: {e}"
        ) from e
    weights = files.get("weights")
    for a, b in _KEY_PAIRS:
        if a in files and b in files:
            x, y = files[a], files[b]
            if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
                raise AnalysisError(
                    f"The data file '{path}': '{a}' has shape {x.shape} and '{b}' has shape {y.shape}; both "
                    "need the same leading (example) axis."
                )
            if weights is None:
                return (x, y)
            _check_npz_weights(path, weights, len(x))
            return (x, y, weights)
    if "inputs" in files and np.issubdtype(files["inputs"].dtype, np.integer):
        tokens = files["inputs"]
        if tokens.ndim == 0:
            raise AnalysisError(
                f"The data file '{path}': 'inputs' is a scalar; it needs an example axis."
            )
        if weights is None:  # lm1b batches: targets = tokens, weights = tokens > 0
            return {"inputs": tokens}
        _check_npz_weights(path, weights, len(tokens))
        return {"inputs": tokens, "weights": weights}
    raise AnalysisError(
        f"The data file '{path}' holds the arrays {sorted(files)}; it needs 'x' and 'y' (or 'inputs' and "
        "'targets'), optionally with 'weights', or integer tokens 'inputs' alone (language-model data: "
        "the targets are the tokens and the weights the padding mask tokens > 0)."
    )


def _check_npz_weights(path: Path, weights: np.ndarray, n: int) -> None:
    if weights.ndim == 0 or len(weights) != n:
        raise AnalysisError(
            f"The data file '{path}': 'weights' has shape {weights.shape}; it needs the same leading "
            f"(example) axis as the data ({n})."
        )


def _is_single_batch(obj) -> bool:
    if isinstance(obj, (tuple, dict, np.ndarray, jax.Array)):
        return True
    return False


def _call_function(fn: Callable, spec: str, batch_size: int | None):
    kwargs = {}
    try:
        params = inspect.signature(fn).parameters
        if batch_size is not None and "batch_size" in params:
            kwargs["batch_size"] = batch_size
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        pass
    try:
        return fn(**kwargs)
    except Exception as e:
        raise AnalysisError(f"The data function '{spec}' raised {type(e).__name__}: {e}") from e


def _cast_batch(batch, dtype):
    def cast(a):
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) and dtype is not None:
            return jnp.asarray(a, dtype=dtype)
        if np.issubdtype(a.dtype, np.integer):
            return jnp.asarray(a, dtype=jnp.int32)
        return jnp.asarray(a)

    return jax.tree_util.tree_map(cast, batch)


def _check_batch(batch, i: int) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise AnalysisError(f"Batch {i} of the data has no arrays.")
    sizes = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
    if -1 in sizes:
        raise AnalysisError(
            f"Batch {i} of the data holds a scalar; every array needs a leading example axis."
        )
    if len(sizes) != 1:
        raise AnalysisError(
            f"The arrays of batch {i} disagree on the number of examples (leading axis sizes "
            f"{sorted(sizes)})."
        )
    return sizes.pop()


def load_data(
    spec: Any,
    *,
    batch_size: int | None = 256,
    num_batches: int | None = None,
    dtype=None,
    progress=None,
) -> LoadedData:
    """Load the batches named by a data spec (see the module docstring).

    From Python, ``spec`` may also be a batch, a list of batches, or ``(x, y)``
    / ``(x, y, weights)`` arrays (cut into batches).

    Args:
      spec: the data spec.
      batch_size: examples per batch when cutting arrays (``None``: one batch).
      num_batches: keep only the first batches (``None``: all).
      dtype: floating arrays are cast to it (integer arrays become int32).
      progress: optional callable ``progress(num_batches_read)``.

    Raises:
      AnalysisError: unknown spec, missing or unreadable file, wrong keys,
        a data function that fails, or an empty data set.

    Examples:
        >>> import numpy as np
        >>> import hvp
        >>> x, y = np.zeros((10, 3), np.float32), np.zeros(10, np.int32)
        >>> ds = hvp.analysis.load_data((x, y), batch_size=4)  # one batch from Python, cut into 4 + 4 + 2
        >>> [b[0].shape[0] for b in ds.batches], ds.num_examples
        ([4, 4, 2], 10)
    """
    batch_size = setting_int("batch_size", batch_size, 1, optional=True)
    num_batches = setting_int("num_batches", num_batches, 1, optional=True)
    if isinstance(spec, str):
        name = spec
        if spec in ("digits", "digits:images"):
            batches = _split(digits(images=spec.endswith(":images")), batch_size, num_batches)
        elif spec.endswith(".npz"):
            batches = _split(_load_npz(Path(spec)), batch_size, num_batches)
        elif ":" in spec:
            out = _call_function(resolve_callable(spec, what="data spec"), spec, batch_size)
            if _is_single_batch(out):
                batches = [out]
            elif hasattr(out, "__iter__"):
                it = iter(out)
                batches = list(itertools.islice(it, num_batches) if num_batches is not None else it)
            else:
                raise AnalysisError(
                    f"The data function '{spec}' returned a {type(out).__name__}; it must return a batch "
                    "(tuple or dict of arrays) or an iterable of batches."
                )
            if num_batches is not None:
                batches = batches[:num_batches]
        else:
            raise AnalysisError(
                f"Unknown data spec {spec!r}: use 'digits', 'digits:images', a path to a .npz file, or "
                "'module.path:function' / 'path/to/file.py:function'."
            )
    else:
        name = f"<{type(spec).__name__}>"
        if isinstance(spec, list):
            batches = list(spec)[:num_batches] if num_batches is not None else list(spec)
        elif (
            isinstance(spec, tuple)
            and len(spec) in (2, 3)
            and all(hasattr(a, "shape") for a in spec)
        ):
            batches = _split(spec, batch_size, num_batches)
        else:
            batches = [spec]

    if not batches:
        raise AnalysisError(f"The data set '{name}' is empty: it holds no examples.")
    out, total = [], 0
    for i, b in enumerate(batches):
        n = _check_batch(b, i)
        if n == 0:
            raise AnalysisError(f"The data set '{name}' is empty: batch {i} has zero examples.")
        out.append(_cast_batch(b, dtype))
        total += n
        if progress is not None:
            progress(i + 1)
    return LoadedData(batches=out, num_examples=total, spec=name)


#: The ``--data`` choices with the shapes they give (listed when the model fails on the data).
DATA_CHOICES = (
    ("digits", "x float32 (N, 64) in [0, 1], y int32 (N,) labels 0..9; N = 1797"),
    ("digits:images", "x float32 (N, 8, 8, 1) NHWC images, y int32 (N,)"),
    (
        "path/to/data.npz",
        "arrays x and y (or inputs and targets) with a leading example axis, optionally "
        "weights; or integer tokens inputs alone",
    ),
    ("module.path:function or file.py:function", "a function returning your own batches"),
)
#: Inputs of the bundled data sets: another choice is suggested when the model runs on it.
_BUNDLED_INPUTS = {"digits": (64,), "digits:images": (8, 8, 1)}


def _shape_text(tree) -> str:
    from hvp import tree as tu

    return tu.shape_summary(tree)


def check_model_on_data(model_fn, params, batch, *, unpack=None, spec=None) -> None:
    """Call ``model_fn(params, inputs)`` on the first batch's inputs by shape (``jax.eval_shape``).

    Nothing is computed. When the model raises, the error names the shapes of the inputs given,
    the model's exception (type and first line), a bundled data choice the model does run on
    (``digits`` / ``digits:images``, tried by shape too) and every data choice with its shapes
    (:data:`DATA_CHOICES`). A batch that cannot be split into inputs and targets is left to the
    operator's own check.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs`` (e.g. :attr:`hvp.flax.FlaxProblem.model_fn`).
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
      batch: the first batch of the data.
      unpack: the problem's ``unpack`` (default :func:`hvp.operators.default_unpack`).
      spec: the data spec, for the message.

    Raises:
      AnalysisError: the model cannot run on the data's inputs.

    Examples:
        >>> import jax.numpy as jnp, numpy as np
        >>> from hvp.analysis import AnalysisError, check_model_on_data
        >>> model = lambda p, x: x.reshape(-1, 64) @ p  # expects 64 features
        >>> batch = (np.zeros((4, 5), np.float32), np.zeros(4, np.int32))
        >>> try:
        ...     check_model_on_data(model, jnp.zeros((64, 10)), batch, spec="my.npz")
        ... except AnalysisError as e:
        ...     print(str(e)[:72])
        The model cannot run on the inputs of the data 'my.npz': inputs float32[
    """
    from hvp.operators import split_batch

    try:
        inputs = split_batch(batch, unpack)[0]
    except Exception:  # noqa: BLE001 - the operator names unpacking errors
        return
    try:
        jax.eval_shape(model_fn, params, inputs)
        return
    except Exception as e:  # noqa: BLE001 - any failure of the user's model
        cause = e
        lines = str(e).strip().splitlines()
        raised = f"{type(e).__name__}: {lines[0] if lines else ''}"
    name = spec if isinstance(spec, str) else "given"
    hint = ""
    bundled = isinstance(spec, str) and spec in _BUNDLED_INPUTS
    if bundled and isinstance(inputs, (jax.Array, np.ndarray)) and np.ndim(inputs) >= 1:
        n = int(np.shape(inputs)[0])
        for other, shape in _BUNDLED_INPUTS.items():
            if other == spec or int(np.prod(shape)) != int(np.prod(np.shape(inputs)[1:])):
                continue
            try:
                jax.eval_shape(model_fn, params, jax.ShapeDtypeStruct((n, *shape), inputs.dtype))
            except Exception:  # noqa: BLE001 - it does not run on that layout either
                continue
            hint = f" The model runs on inputs of shape {(n, *shape)}: use --data {other} (data='{other}')."
            break
    choices = "; ".join(f"'{c}': {d}" for c, d in DATA_CHOICES)
    raise AnalysisError(
        f"The model cannot run on the inputs of the data '{name}': inputs "
        f"{_shape_text(inputs)}; the model raised {raised}.{hint} Data choices (--data): "
        f"{choices}."
    ) from cause
