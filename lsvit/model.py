"""Vision transformer whose layer order is runtime data (ViT-B/16, DeiT-B distilled).

The encoder blocks' parameters are stacked on a leading layer axis under
``encoderblock`` (the big_vision "scan" layout; inner names match the original
ViT ``.npz`` checkpoints). A forward pass takes ``order``, an int array of layer
indices, and runs block ``order[i]`` at position i by indexing the stack. So:
  * one compiled program serves every order of a given length (no retracing);
  * a pruned model is a shorter order, a merged model is a gathered stack.

Implementations (``impl``; measured choice in BENCHMARKS.md): 'fetch' (training default:
each layer's weights copied out of the stack as it runs, forward and backward, see
``lsvit/fetch.py``), 'gather' (the stack indexed inside a ``lax.scan``; what 'fetch' does
without training), 'switch' (``lax.switch`` over the L layers), 'sequential' (the plain model
with per-layer parameters, original order only: the reference).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsvit import fetch as fetch_lib
from lsvit import order as order_lib

IMPLS = ("fetch", "gather", "switch", "sequential")
INITS = {"normal": nn.initializers.normal(0.02), "zeros": nn.initializers.zeros}
DEIT_HEADS = ("mean", "cls")

# name -> (width, depth, mlp_dim, heads); big_vision's table.
SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


DIMENSIONS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


def decode_name(name: str) -> dict:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  m = re.fullmatch(r"(Ti|S|M|B|L|H)/(\d+)", name)
  if not m:
    raise ValueError(f"model name {name!r} not understood: expected e.g. 'B/16', 'S/16', 'Ti/4' "
                     f"(size one of {list(SIZES)}, then /patch)")
  width, depth, mlp_dim, heads = SIZES[m.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
              patch_size=int(m.group(2)))


def dot_product_attention(query, key, value, bias=None, mask=None, dropout_rng=None,
                          dropout_rate=0.0, broadcast_dropout=True, deterministic=True, dtype=None,
                          **unused):
  """Flax's ``dot_product_attention`` with the heads moved ahead of the tokens, so that the
  two attention matmuls batch over leading dimensions and XLA CPU inserts no transposes
  (faster, BENCHMARKS.md). Same arithmetic and dropout draw as flax's: the same numbers."""
  del unused, dtype
  if bias is not None or mask is not None:
    raise ValueError("lsvit's attention takes no bias or mask (a ViT attends to every token)")
  q, k, v = (jnp.swapaxes(a, -3, -2) for a in (query, key, value))  # [..., heads, tokens, depth]
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  w = jax.nn.softmax(jnp.einsum("...hqd,...hkd->...hqk", q, k)).astype(q.dtype)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = (1,) * (w.ndim - 2) + w.shape[-2:] if broadcast_dropout else w.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    w = w * (keep.astype(w.dtype) / jnp.asarray(keep_prob, w.dtype))
  return jnp.swapaxes(jnp.einsum("...hqk,...hkd->...hqd", w, v), -3, -2)


def fused_attention(query, key, value, bias=None, mask=None, dropout_rng=None,
                    dropout_rate=0.0, deterministic=True, dtype=None, **unused):
  """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU when it applies)."""
  del unused, dtype
  if dropout_rate > 0.0 and not deterministic:
    raise ValueError("attention='fused' does not support attention dropout; set attn_dropout=0")
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask)


def gelu(x):
  """Exact GELU in the form PyTorch computes it, x/2 (1 + erf(x/sqrt 2)): ``jax.nn.gelu``'s
  erfc form lowers on XLA CPU to branches with exponentials and divisions (slower,
  BENCHMARKS.md)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    d = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    x = dense(self.mlp_dim)(x)
    x = gelu(x)  # exact (erf) GELU, as HF "gelu" and the original ViT
    x = nn.Dropout(self.dropout)(x, deterministic)
    return dense(d)(x)


class Block(nn.Module):
  """One encoder layer; LayerShuffle-position/-predict extras are part of it."""
  mlp_dim: int
  num_heads: int
  depth: int  # number of positions a layer can be at (size of position tables/heads)
  variant: str = "baseline"
  pos_dim: int = 32
  pos_table: str = "shared"
  pos_table_init: str = "normal"
  predict_head_init: str = "zeros"
  dropout: float = 0.0
  attn_dropout: float = 0.0
  ln_eps: float = 1e-6
  attention: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, position, shared_pos_emb=None, deterministic=True):
    ln = functools.partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype)
    if self.variant == "position":
      # Paper 3.2: z'' = Dropout(GELU(LN(concat(z, e_p)) W_proj)) + z.
      if self.pos_table == "per_layer":
        table = self.param("pos_table", INITS[self.pos_table_init], (self.depth, self.pos_dim))
        emb = jnp.asarray(table)[position]  # host (numpy) params too
      else:
        emb = shared_pos_emb
      emb = jnp.broadcast_to(emb.astype(x.dtype), x.shape[:-1] + (self.pos_dim,))
      h = ln(name="PositionProj_LayerNorm")(jnp.concatenate([x, emb], axis=-1))
      h = nn.Dense(x.shape[-1], dtype=self.dtype, name="PositionProj_Dense",
                   kernel_init=nn.initializers.xavier_uniform())(h)
      h = nn.Dropout(self.dropout)(gelu(h), deterministic)
      x = x + h

    y = ln(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.attn_dropout,
        kernel_init=nn.initializers.xavier_uniform(), broadcast_dropout=False,
        attention_fn=fused_attention if self.attention == "fused" else dot_product_attention,
        name="MultiHeadDotProductAttention_1")(y, y, deterministic=deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = x + y
    y = ln(name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="MlpBlock_3")(y, deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = x + y

    pos_logits = None
    if self.variant == "predict":
      # Paper 3.3: u = LN(z_t) W_pred, on the token mean (as the authors' code).
      u = ln(name="PositionHead_LayerNorm")(x.mean(axis=1))
      pos_logits = nn.Dense(self.depth, dtype=self.dtype, name="PositionHead_Dense",
                            kernel_init=INITS[self.predict_head_init])(u).astype(jnp.float32)
    return x, pos_logits


class Encoder(nn.Module):
  """Runs the stacked blocks in ``order``. The one place layers are executed."""
  depth: int
  block: Block
  impl: str = "fetch"
  remat: bool = False

  @nn.compact
  def __call__(self, x, order, active=None, train=False, capture=False):
    block = self.block.clone(parent=None)  # an unbound template: apply() is a pure function
    table = None
    if block.variant == "position" and block.pos_table == "shared":
      table = self.param("layer_pos_embedding", INITS[block.pos_table_init],
                         (self.depth, block.pos_dim))
    key = self.make_rng("dropout") if train and _uses_dropout(block) else None

    def run_block(params, x, position, table=table, key=key):
      rngs = {} if key is None else {"dropout": jax.random.fold_in(key, position)}
      emb = None if table is None else jnp.asarray(table)[position]  # host (numpy) params too
      return run_layer(block, params, x, position, emb, train, rngs)

    def finish(layer, x, act):  # one position: the layer (or LayerDrop's skip) and its outputs
      skip = lambda x: (x, _no_pos_logits(block, x))  # a skipped layer costs nothing
      y, pos_logits = layer(x) if active is None else jax.lax.cond(act, layer, skip, x)
      return y, {"pos_logits": pos_logits, "hidden": y if capture else None}

    act = jnp.ones((order.shape[0],), bool) if active is None else active
    if self.impl == "sequential":
      # The plain model, the measurement reference: separate parameters per layer
      # (encoderblock_0 ... encoderblock_{L-1}, as non-scanned big_vision), fixed order.
      # Its parameters are not stacked: convert with ``unstack``.
      outs = []
      for i in range(order.shape[0]):
        p = self.param(f"encoderblock_{i}", lambda rng: block.init(rng, x[:1], 0, None)["params"])
        y, pos_logits = run_block(p, x, i)
        x = y if active is None else jnp.where(act[i], y, x)
        outs.append({"pos_logits": pos_logits, "hidden": x if capture else None})
      return x, _stack(outs)

    def init_stack(rng):  # each layer initialised independently, stacked on axis 0
      emb0 = None if table is None else table[0]
      return jax.vmap(lambda k: block.init(k, x[:1], 0, emb0)["params"])(
          jax.random.split(rng, self.depth))

    stack = self.param("encoderblock", init_stack)
    return self.run_layers(run_block, finish, stack, table, key, x, order, act, train)

  def run_layers(self, run_block, finish, stack, table, key, x, order, act, train):
    """Positions 0..n-1 running layers ``order`` of ``stack``: (x, per-position outputs).
    Without training no gradient is needed, and 'fetch' indexes the stack inside the scan as
    'gather' does (no copies; measured faster)."""
    n = order.shape[0]
    if self.impl == "fetch" and train:
      # The position table and dropout key go in as arguments: a custom gradient must not
      # close over them.
      def layer_fn(w, table, x, i, extras):
        act, key = extras
        layer = lambda x: run_block(w, x, i, table, key)
        return finish(jax.checkpoint(layer) if self.remat else layer, x, act[i])

      x, outs = fetch_lib.fetch_layers(layer_fn, n)(stack, table, x, order, (act, key))
      return x, _stack(outs)

    take = lambda idx: jax.tree.map(lambda a: jnp.asarray(a)[idx], stack)
    if self.impl == "switch":
      branches = [functools.partial(lambda l, x, p: run_block(take(l), x, p), l)
                  for l in range(self.depth)]
      apply_layer = lambda idx, x, p: jax.lax.switch(idx, branches, x, p)
    else:
      apply_layer = lambda idx, x, p: run_block(take(idx), x, p)

    def step(x, inputs):
      position, idx, a = inputs
      return finish(lambda x: apply_layer(idx, x, position), x, a)

    if self.remat:
      step = jax.checkpoint(step)
    return jax.lax.scan(step, x, (jnp.arange(n, dtype=jnp.int32), order, act))


def run_layer(block: Block, params, x, position, emb=None, train=False, rngs=None):
  """One layer (``params``: its slice of the stack) at ``position``; ``emb`` is row ``position``
  of LayerShuffle-position's shared table. Returns (x, position logits or None)."""
  return block.apply({"params": params}, x, position, emb, not train, rngs=rngs or {})


def _stack(outs):
  return jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else {}


def _uses_dropout(block):
  return block.dropout > 0 or block.attn_dropout > 0


def _no_pos_logits(block, x):
  if block.variant != "predict":
    return None
  return jnp.zeros((x.shape[0], block.depth), jnp.float32)


class ViT(nn.Module):
  """ViT (``distilled=False``) or DeiT distilled (``distilled=True``), NHWC input.

  ``__call__`` returns a dict: ``logits`` [B, classes]; for ``predict`` also
  ``pos_logits`` [n, B, depth]; with ``capture=True`` also ``hidden``
  [n, B, tokens, width] (each executed layer's output, in execution order) and
  ``embedded`` [B, tokens, width] (the first layer's input).
  """
  impls = IMPLS     # class attributes, not fields: what bench/lost_impls.py extends
  encoder = Encoder
  num_classes: int = 1000
  image_size: int = 224
  channels: int = 3
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  distilled: bool = False
  variant: str = "baseline"
  pos_dim: int = 32
  pos_table: str = "shared"
  pos_table_init: str = "normal"     # the authors' code: "zeros"
  predict_head_init: str = "zeros"   # the authors' code: "normal" (transformers' Linear init)
  deit_head: str = "mean"            # distilled: "mean" of both heads | "cls" head alone
  dropout: float = 0.0
  attn_dropout: float = 0.0
  ln_eps: float = 1e-6
  head_zeroinit: bool = True
  impl: str = "fetch"
  attention: str = "xla"
  remat: bool = False
  dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + (2 if self.distilled else 1)

  def check_images(self, images):
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images have dtype {images.dtype}; the model takes preprocessed float "
                       f"images (scaled and normalised as lsvit.data.Preprocess does), not raw "
                       f"pixels: pass them through Preprocess first")
    want = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      hint = ""
      channels_first = images.ndim == 4 and images.shape[1] == self.channels
      if channels_first and images.shape[-1] != self.channels:
        hint = " (looks channels-first: transpose to NHWC)"
      raise ValueError(f"expected images of shape [batch, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                       f"got {tuple(images.shape)}{hint}; resize the input or set the model's "
                       f"image_size/channels")

  @nn.compact
  def embed(self, images, train=False):
    """Images -> the first layer's input [B, tokens, width]: patch embedding, class (and
    distillation) tokens, position embedding. With ``classify`` and the blocks, the whole model
    in pieces (``lsvit.swarm`` runs them in different processes)."""
    self.check_images(images)
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", dtype=self.dtype, name="embedding")(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    tokens = [self.param("cls", nn.initializers.zeros, (1, 1, self.width))]
    if self.distilled:
      tokens.append(self.param("dist", nn.initializers.normal(0.02), (1, 1, self.width)))
    tokens = [jnp.broadcast_to(t, (b, 1, self.width)).astype(self.dtype) for t in tokens]
    x = jnp.concatenate(tokens + [x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (1, x.shape[1], self.width))
    return nn.Dropout(self.dropout)(x + pos.astype(self.dtype), not train)

  @nn.compact
  def classify(self, x):
    """The last layer's output [B, tokens, width] -> logits [B, classes] (final norm, heads)."""
    if self.deit_head not in DEIT_HEADS:
      raise ValueError(f"unknown deit_head {self.deit_head!r}; choose one of {list(DEIT_HEADS)}")
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="encoder_norm")(x)
    head_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.xavier_uniform()
    head = functools.partial(nn.Dense, self.num_classes, kernel_init=head_init, dtype=self.dtype)
    logits = head(name="head")(x[:, 0]).astype(jnp.float32)
    if self.distilled and self.deit_head == "mean":  # as HF ...WithTeacher: both heads' mean
      logits = (logits + head(name="head_dist")(x[:, 1]).astype(jnp.float32)) / 2
    return logits

  def block(self) -> Block:
    """The encoder layer as an unbound module: ``block().apply({"params": stack[l]}, x,
    position, shared_pos_emb)`` runs layer l at ``position`` (what ``Encoder`` does)."""
    return Block(mlp_dim=self.mlp_dim, num_heads=self.num_heads, depth=self.depth,
                 variant=self.variant, pos_dim=self.pos_dim, pos_table=self.pos_table,
                 pos_table_init=self.pos_table_init, predict_head_init=self.predict_head_init,
                 dropout=self.dropout, attn_dropout=self.attn_dropout, ln_eps=self.ln_eps,
                 attention=self.attention, dtype=self.dtype, parent=None)

  @nn.compact
  def __call__(self, images, order=None, *, train=False, active=None, capture=False):
    if self.variant not in order_lib.VARIANTS:
      raise ValueError(f"unknown variant {self.variant!r}; choose one of {order_lib.VARIANTS}")
    if self.impl not in self.impls:
      raise ValueError(
          f"unknown impl {self.impl!r}; choose one of {self.impls} (see BENCHMARKS.md)")
    valid = None  # a traced order is checked on the device: see ``poison``
    if order is None:
      order = jnp.arange(self.depth, dtype=jnp.int32)
    elif not isinstance(order, jax.core.Tracer):
      order = jnp.asarray(order_lib.check_order(order, self.depth))
    else:
      if order.ndim != 1 or order.shape[0] > self.depth or order.shape[0] == 0:
        raise ValueError(f"layer order must be a 1-D array of 1 to {self.depth} layer indices, "
                         f"got shape {order.shape}")
      if not jnp.issubdtype(order.dtype, jnp.integer):
        raise ValueError(f"layer order must contain integer layer indices, got {order.dtype}")
      valid = order_lib.order_is_valid(order, self.depth)
    if self.impl == "sequential" and (order.shape[0] != self.depth or
                                      (not isinstance(order, jax.core.Tracer) and
                                       (np.asarray(order) != np.arange(self.depth)).any())):
      raise ValueError(
          "impl='sequential' runs the original order only; use impl='gather' for others")

    x = embedded = self.embed(images, train)
    for name, value, allowed in (("pos_table_init", self.pos_table_init, INITS),
                                 ("predict_head_init", self.predict_head_init, INITS)):
      if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(allowed)}")
    block = self.block()
    x, aux = self.encoder(self.depth, block, self.impl, self.remat, name="Transformer")(
        x, order, active, train, capture)
    out = {"logits": self.classify(x)}
    if self.variant == "predict":
      out["pos_logits"] = aux["pos_logits"]
    if capture:
      out["hidden"] = aux["hidden"]
      out["embedded"] = embedded
    if valid is not None:
      out = poison(out, valid)
    return out


def poison(outputs: dict, valid):
  """Every output NaN unless ``valid``. Under ``jit`` an order cannot raise: an index out
  of range would be clamped and a repeated layer would run twice, giving plausible logits;
  NaN logits cannot pass for a result. ``order.check_order`` says what is wrong, on the host."""
  return {k: jnp.where(valid, v, jnp.asarray(jnp.nan, v.dtype)) for k, v in outputs.items()}


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ViT) if f.name not in ("parent", "name"))


def build(cfg, cls=None) -> ViT:
  """A ViT from a config dict: optional ``name`` ('B/16') plus any ViT field."""
  cfg = dict(cfg)
  kw = decode_name(cfg.pop("name")) if cfg.get("name") else {}
  unknown = sorted(set(cfg) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f"unknown model config fields {unknown}; known: {sorted(MODEL_FIELDS)}")
  kw.update(cfg)
  if isinstance(kw.get("dtype"), str):
    kw["dtype"] = jnp.dtype(kw["dtype"])
  return (cls or ViT)(**kw)


def unstack(params):
  """Stacked parameters -> the per-layer layout of impl='sequential' (same weights)."""
  params = dict(params)
  enc = dict(params["Transformer"])
  stack = enc.pop("encoderblock")
  depth = jax.tree.leaves(stack)[0].shape[0]
  for i in range(depth):
    enc[f"encoderblock_{i}"] = jax.tree.map(lambda a: a[i], stack)
  params["Transformer"] = enc
  return params


def init_params(model: ViT, seed: int = 0):
  dummy = jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)
  return jax.jit(model.init)(jax.random.key(seed), dummy)["params"]


def param_shapes(model: ViT):
  dummy = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
