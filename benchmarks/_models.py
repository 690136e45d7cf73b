"""The models and data shared by the benchmark groups.

* :func:`digits` - all 1,797 scikit-learn digits (8x8 images, 64 features scaled
  to [0, 1], 10 classes); bundled with scikit-learn, no download.
* :func:`mlp` - the tanh MLP ``64-w-w-10`` with softmax cross-entropy, weights
  drawn from NumPy seed 0 (``N(0, 1/fan_in)`` weights, ``N(0, 0.01)`` biases).
  ``n = w^2 + 76 w + 10`` parameters: w = 32 gives 3,466, w = 1024 gives 1,126,410.
  :func:`benchmarks.peers_torch` builds the same network in PyTorch from these arrays.
* :func:`cnn` - two 3x3 tanh convolutions and a dense head on the 8x8 images.
* :func:`transformer` - a small Flax (Linen) pre-norm transformer language model on
  random token sequences.
* :func:`nnx_lm` - the small Flax NNX transformer LM (168k parameters) of the cold/warm
  benchmark, weights from :mod:`benchmarks._arrays` (shared with its PyTorch twin);
  :func:`nnx_lm_random` the same architecture at any size (10M to 1B parameters for
  ``bench_lm_scale``), weights drawn with ``jax.random`` in the target dtype.

Each builder returns ``(params, loss_fn, batch)`` with ``loss_fn(params, batch)`` a mean loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._arrays import digits_np as _digits_np  # re-exported
from benchmarks._arrays import mlp_params_np, mlp_size  # noqa: F401  (re-exported)


def digits(dtype=jnp.float32, num_examples: int | None = None):
    """``(x, y)``: inputs ``(N, 64)`` in ``dtype`` and integer labels ``(N,)``."""
    x, y = _digits_np()
    if num_examples is not None:
        x, y = x[:num_examples], y[:num_examples]
    return jnp.asarray(x, dtype), jnp.asarray(y)


def mlp_apply(params, x):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def cross_entropy(logits, y):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def mlp_loss(params, batch):
    x, y = batch
    return cross_entropy(mlp_apply(params, x), y)


def mlp(width: int, *, dtype=jnp.float32, num_examples: int | None = None, seed: int = 0):
    """``(params, loss_fn, batch)`` for the tanh MLP ``64-width-width-10`` on the digits."""
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), mlp_params_np(width, seed))
    return params, mlp_loss, digits(dtype, num_examples)


# ------------------------------------------------------------------------------------------
# CNN on the 8x8 images
# ------------------------------------------------------------------------------------------
def _conv(x, w, b):
    y = jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + b


def cnn_apply(params, x):
    h = x.reshape(x.shape[0], 8, 8, 1)
    h = jnp.tanh(_conv(h, params["conv1"]["w"], params["conv1"]["b"]))
    h = jnp.tanh(_conv(h, params["conv2"]["w"], params["conv2"]["b"]))
    h = h.reshape(h.shape[0], -1)
    return h @ params["head"]["w"] + params["head"]["b"]


def cnn_loss(params, batch):
    x, y = batch
    return cross_entropy(cnn_apply(params, x), y)


def cnn(*, channels=(16, 32), dtype=jnp.float32, num_examples: int | None = None, seed: int = 0):
    """Two 3x3 tanh convolutions (``channels``) and a dense head: ``(params, loss_fn, batch)``."""
    rng = np.random.default_rng(seed)
    c1, c2 = channels

    def w(*shape, fan_in):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), dtype)

    params = {
        "conv1": {"w": w(3, 3, 1, c1, fan_in=9), "b": jnp.zeros((c1,), dtype)},
        "conv2": {"w": w(3, 3, c1, c2, fan_in=9 * c1), "b": jnp.zeros((c2,), dtype)},
        "head": {"w": w(64 * c2, 10, fan_in=64 * c2), "b": jnp.zeros((10,), dtype)},
    }
    return params, cnn_loss, digits(dtype, num_examples)


# ------------------------------------------------------------------------------------------
# small Flax transformer language model
# ------------------------------------------------------------------------------------------
def transformer(
    *,
    vocab=64,
    seq_len=32,
    d_model=64,
    heads=4,
    layers=2,
    batch=128,
    dtype=jnp.float32,
    seed: int = 0,
):
    """A pre-norm causal transformer LM (Flax Linen) on random tokens: ``(params, loss_fn, batch)``."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h):
            mask = nn.make_causal_mask(jnp.ones(h.shape[:2], jnp.int32))
            a = nn.SelfAttention(num_heads=heads, dtype=dtype, param_dtype=dtype)(
                nn.LayerNorm(dtype=dtype, param_dtype=dtype)(h), mask=mask
            )
            h = h + a
            m = nn.LayerNorm(dtype=dtype, param_dtype=dtype)(h)
            m = nn.Dense(4 * d_model, dtype=dtype, param_dtype=dtype)(m)
            m = nn.Dense(d_model, dtype=dtype, param_dtype=dtype)(nn.gelu(m))
            return h + m

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(vocab, d_model, dtype=dtype, param_dtype=dtype)(tokens)
            pos = self.param("pos", nn.initializers.normal(0.02), (seq_len, d_model), dtype)
            h = h + pos[None, : tokens.shape[1]]
            for _ in range(layers):
                h = Block()(h)
            h = nn.LayerNorm(dtype=dtype, param_dtype=dtype)(h)
            return nn.Dense(vocab, dtype=dtype, param_dtype=dtype)(h)

    model = LM()
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(batch, seq_len + 1)), jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), tokens[:, :-1])["params"]

    def loss_fn(p, toks):
        logits = model.apply({"params": p}, toks[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

    return params, loss_fn, tokens


def nnx_lm(*, dtype=jnp.float32, **config):
    """The small Flax NNX transformer LM of :data:`benchmarks._arrays.LM_CONFIG` (168,192 parameters).

    Pre-norm causal transformer: token embedding + learned positions, ``layers`` blocks of
    (LayerNorm, 4-head self-attention with a causal mask, residual; LayerNorm, MLP
    ``d -> 4d -> d`` with exact GELU, residual), final LayerNorm, linear head to the vocabulary;
    mean next-token cross-entropy. The weights are :func:`benchmarks._arrays.lm_params_np`
    (the PyTorch twin :func:`benchmarks.peers_torch.build_lm` holds the same numbers).
    ``config`` overrides entries of ``LM_CONFIG`` (e.g. a tiny model for ``--quick``).

    Returns ``(model, batch)``: the ``nnx.Module`` (built abstractly, then given the
    weights: no random initialisation runs) and ``(inputs (B, T), targets (B, T))`` int32;
    ``hvp.flax.from_nnx(model, "cross_entropy").hessian(batch)`` is its Hessian.
    """
    from flax import nnx

    from benchmarks._arrays import LM_CONFIG, lm_params_np, lm_tokens_np

    cfg = {**LM_CONFIG, **config}
    graphdef, state = nnx_lm_abstract(**cfg)
    weights = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), lm_params_np(**cfg))
    nnx.replace_by_pure_dict(state, weights)
    model = nnx.merge(graphdef, state)
    tokens = jnp.asarray(lm_tokens_np(**cfg))
    return model, (tokens[:, :-1], tokens[:, 1:])


def nnx_lm_abstract(**config):
    """``(graphdef, state)`` of the NNX transformer LM of :func:`nnx_lm` for ``config``
    (``vocab``, ``seq_len``, ``d_model``, ``heads``, ``layers``, ``seed``), built with
    ``nnx.eval_shape``: the state holds shapes only (no memory, no random initialisation)."""
    from flax import nnx

    cfg = dict(config)
    d, heads = cfg["d_model"], cfg["heads"]
    hd = d // heads

    class Attention(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(d, d, rngs=rngs)
            self.key = nnx.Linear(d, d, rngs=rngs)
            self.value = nnx.Linear(d, d, rngs=rngs)
            self.out = nnx.Linear(d, d, rngs=rngs)

        def __call__(self, h):
            b, t, _ = h.shape

            def split(x):
                return x.reshape(b, t, heads, hd)

            q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
            causal = jnp.tril(jnp.ones((t, t), bool))
            s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
            a = jax.nn.softmax(s, axis=-1)
            return self.out(jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d))

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
            self.attn = Attention(rngs)
            self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
            self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
            self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, h):
            h = h + self.attn(self.ln1(h))
            return h + self.fc2(jax.nn.gelu(self.fc1(self.ln2(h)), approximate=False))

    class LM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(cfg["vocab"], d, rngs=rngs)
            self.pos = nnx.Param(jnp.zeros((cfg["seq_len"], d)))
            self.blocks = nnx.List([Block(rngs) for _ in range(cfg["layers"])])
            self.ln_f = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
            self.head = nnx.Linear(d, cfg["vocab"], rngs=rngs)

        def __call__(self, tokens):
            h = self.embed(tokens) + self.pos[None, : tokens.shape[1]]
            for block in self.blocks:
                h = block(h)
            return self.head(self.ln_f(h))

    return nnx.split(nnx.eval_shape(lambda: LM(nnx.Rngs(cfg["seed"]))))


def nnx_lm_random(*, dtype=jnp.float32, **config):
    """:func:`nnx_lm` at any size, its weights drawn with ``jax.random`` directly in ``dtype``.

    Same architecture and parameter layout as :func:`nnx_lm` (``config`` overrides
    :data:`benchmarks._arrays.LM_CONFIG`; :func:`benchmarks._arrays.lm_size` counts the
    parameters) and the same distributions as :func:`benchmarks._arrays.lm_params_np`
    (kernels ``N(0, 1/fan_in)``, biases ``N(0, 0.01^2)``, LayerNorm scales ``1 + N(0, 0.1^2)``,
    embeddings ``N(0, 1)``, positions ``N(0, 0.1^2)``), but drawn leaf by leaf on the default
    device from ``jax.random.key(seed)``, so a model of a billion parameters is built without
    a float64 copy on the host. Tokens are uniform on the vocabulary (``jax.random``).

    Returns ``(model, batch)`` as :func:`nnx_lm`.
    """
    from flax import nnx

    from benchmarks._arrays import LM_CONFIG

    cfg = {**LM_CONFIG, **config}
    graphdef, state = nnx_lm_abstract(**cfg)
    pure = nnx.to_pure_dict(state)
    paths = jax.tree_util.tree_flatten_with_path(pure)[0]
    key = jax.random.key(cfg["seed"])

    def draw(i, path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        k = jax.random.fold_in(key, i)
        z = jax.random.normal(k, leaf.shape, jnp.float32)
        if name == "kernel":
            z = z / np.sqrt(leaf.shape[0])
        elif name == "bias":
            z = 0.01 * z
        elif name == "scale":
            z = 1.0 + 0.1 * z
        elif name != "embedding":  # positions
            z = 0.1 * z
        return z.astype(dtype)

    weights = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(pure),
        [draw(i, path, leaf) for i, (path, leaf) in enumerate(paths)],
    )
    nnx.replace_by_pure_dict(state, weights)
    model = nnx.merge(graphdef, state)
    tokens = jax.random.randint(
        jax.random.fold_in(key, len(paths)), (cfg["batch"], cfg["seq_len"] + 1), 0, cfg["vocab"]
    ).astype(jnp.int32)
    return model, (tokens[:, :-1], tokens[:, 1:])


def num_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------------------------------
# Flax-example shapes for the analysis benchmark (``hvp analyze`` factories)
# ------------------------------------------------------------------------------------------
def resnet_bn(*, stage_sizes=(1, 1), filters=8, image=16, num_classes=10, batch=32, seed=0):
    """A ResNet with BatchNorm in the style of the Flax ImageNet example, shrunk.

    ``conv_init`` (3x3; the example's 7x7 stride 2 stem is shrunk with the images) ->
    ``bn_init`` -> ReLU -> 2x2 max-pool -> ``ResNetBlock``\\ s (3x3 conv, BatchNorm, ReLU, 3x3
    conv, BatchNorm with zero-initialised scale, a 1x1 ``conv_proj``/``norm_proj`` shortcut when
    the shape changes; stage ``i`` has ``filters * 2**i`` channels, stride 2 from the second
    stage) -> global mean -> ``Dense``. Evaluated with ``train=False`` (BatchNorm's running
    statistics, as at evaluation), softmax cross-entropy on integer labels.

    Returns ``(factory, variables, batches)``: ``factory()`` is an ``hvp analyze`` model factory
    returning ``((module, variables, {"train": False}), "cross_entropy")``; ``variables`` holds
    ``params`` and ``batch_stats`` (running statistics perturbed away from their initial 0/1,
    as after training); ``batches`` is one ``(images NHWC, labels)`` batch of random data.
    """
    import flax.linen as nn

    class ResNetBlock(nn.Module):
        filters: int
        strides: tuple = (1, 1)

        @nn.compact
        def __call__(self, x, train: bool = False):
            norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
            residual = x
            y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
            y = nn.relu(norm()(y))
            y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
            y = norm(scale_init=nn.initializers.zeros_init())(y)
            if residual.shape != y.shape:
                residual = nn.Conv(
                    self.filters, (1, 1), self.strides, use_bias=False, name="conv_proj"
                )(residual)
                residual = norm(name="norm_proj")(residual)
            return nn.relu(residual + y)

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(filters, (3, 3), use_bias=False, name="conv_init")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
            for i, size in enumerate(stage_sizes):
                for j in range(size):
                    strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                    x = ResNetBlock(filters * 2**i, strides)(x, train)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(num_classes)(x)

    model = ResNet()
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_classes, size=batch), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), x[:1])  # one compile, not op by op
    # trained-looking values: nonzero BatchNorm scales (the example zero-initialises the last one
    # of each block, where the Hessian of its conv would vanish) and running statistics
    variables = jax.tree_util.tree_map(
        lambda a: (
            jnp.asarray(np.abs(np.asarray(a) + 0.3 * rng.normal(size=a.shape)) + 0.5, a.dtype)
            if a.ndim == 1
            else a
        ),
        variables,
    )

    def factory():
        return (model, variables, {"train": False}), "cross_entropy"

    return factory, variables, [(x, y)]


def lm1b_like(*, num_layers=2, vocab=32, emb=16, heads=2, mlp=32, seq_len=16, batch=8, seed=0):
    """A decoder-only Transformer LM in the style of the Flax lm1b example (Linen), tiny.

    Module names as the example's: ``decoder/Embed_0``, ``decoder/encoderdecoderblock_{i}``
    (``LayerNorm_0``, ``SelfAttention_0`` (``query``/``key``/``value``/``out``), ``LayerNorm_1``,
    ``MlpBlock_0`` (``Dense_0``/``Dense_1``)), ``decoder/encoderdecoder_norm``,
    ``decoder/logitdense``; fixed sinusoidal positions, causal mask combined with the padding
    mask, inputs shifted right inside the model. The loss is the example's: token
    cross-entropy weighted by ``targets > 0`` (padding excluded) and divided by the number of
    real tokens.

    Returns ``(factory, variables, batches)`` like :func:`resnet_bn`; the batch is
    ``(tokens, tokens)`` (the example trains on ``inputs == targets``) with trailing padding
    (token 0) on about a quarter of the positions.
    """
    import flax.linen as nn

    def sinusoid(length, d):
        pos = np.arange(length)[:, None]
        div = np.exp(np.arange(0, d, 2) * -(np.log(10000.0) / d))
        pe = np.zeros((length, d), np.float32)
        pe[:, 0::2] = np.sin(pos * div)
        pe[:, 1::2] = np.cos(pos * div)
        return jnp.asarray(pe)

    class MlpBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(mlp)(x))
            return nn.Dense(x.shape[-1])(h)

    class EncoderDecoder1DBlock(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            y = nn.LayerNorm()(x)
            y = nn.MultiHeadDotProductAttention(num_heads=heads, name="SelfAttention_0")(
                y, y, mask=mask
            )
            x = x + y
            z = MlpBlock(name="MlpBlock_0")(nn.LayerNorm()(x))
            return x + z

    class Decoder(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            mask = nn.combine_masks(
                nn.make_attention_mask(tokens > 0, tokens > 0), nn.make_causal_mask(tokens)
            )
            shifted = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]  # shift right (BOS = 0)
            embed = nn.Embed(vocab, emb, embedding_init=nn.initializers.normal(1.0), name="Embed_0")
            y = embed(shifted) + sinusoid(tokens.shape[1], emb)[None]
            for i in range(num_layers):
                y = EncoderDecoder1DBlock(name=f"encoderdecoderblock_{i}")(y, mask)
            y = nn.LayerNorm(name="encoderdecoder_norm")(y)
            return nn.Dense(vocab, name="logitdense")(y)

    class TransformerLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return Decoder(name="decoder")(tokens)

    model = TransformerLM()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch, seq_len))
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=batch)  # ~25% padding on average
    tokens = np.where(np.arange(seq_len)[None] < lengths[:, None], tokens, 0)
    tokens = jnp.asarray(tokens, jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), tokens[:1])

    def masked_cross_entropy(logits, targets):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        weights = (targets > 0).astype(nll.dtype)
        return jnp.sum(nll * weights) / jnp.sum(weights)

    def factory():
        return (model, variables), masked_cross_entropy

    return factory, variables, [(tokens, tokens)]
