"""Vision transformer whose layer order is runtime data (ViT-B/16, DeiT-B distilled).

The encoder blocks' parameters are stacked on a leading layer axis under
``encoderblock`` (the big_vision "scan" layout; inner names match the original
ViT ``.npz`` checkpoints). A forward pass takes ``order``, an int array of layer
indices, and runs block ``order[i]`` at position i by indexing the stack. So:
  * one compiled program serves every order of a given length (no retracing);
  * a pruned model is a shorter order, a merged model is a gathered stack.

Implementation choice (``impl``), measured by ``bench/order_impl.py`` against the plain
model on this project's 2-core CPU, recorded in BENCHMARKS.md: 'fetch' (default) copies
each layer's weights out of the stack just before it runs, forward and backward, with a
hand-written backward that keeps no weights (the plain model's time and memory);
'permute' gathers the whole stack into execution order once per training step (same time,
9-15% more memory); 'gather' indexes the stack inside a ``lax.scan``; 'unrolled' indexes
it in an unrolled loop; 'switch' dispatches with ``lax.switch`` over L branches;
'sequential' is the plain model (separate per-layer parameters, original order only), the
reference. Without training (no backward) 'fetch' and 'permute' index inside the scan as
'gather' does: no copies, measured faster.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsvit import order as order_lib

IMPLS = ("fetch", "permute", "gather", "unrolled", "switch", "sequential")

# name -> (width, depth, mlp_dim, heads); big_vision's table.
SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(name: str) -> dict:
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
  """Flax's ``dot_product_attention`` computed with the heads moved ahead of the tokens:
  the two attention matmuls then batch over leading dimensions, which XLA CPU runs without
  the transposes it inserts around flax's '...qhd,...khd->...hqk' (fwd+bwd per layer:
  8.3 vs 10.0 ms at S/16 224 px batch 4, 0.56 vs 0.72 ms at Ti/16 32 px batch 64).
  Same arithmetic and the same dropout draw as flax's, so the same numbers."""
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
  """Exact GELU in the form PyTorch computes it, x/2 (1 + erf(x/sqrt 2)). ``jax.nn.gelu``'s
  exact form, x/2 erfc(-x/sqrt 2), lowers on XLA CPU to two branches with exponentials and
  divisions: its forward and backward took 17 of 182 ms of a one-core Ti/16 32 px training
  step, this form 10 ms (BENCHMARKS.md)."""
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
        table = self.param("pos_table", nn.initializers.normal(0.02), (self.depth, self.pos_dim))
        emb = table[position]
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
                            kernel_init=nn.initializers.zeros)(u).astype(jnp.float32)
    return x, pos_logits


@jax.custom_vjp
def permute_layers(stack, order):
  """``stack[order]`` for every leaf: the layers in execution order, gathered once.

  The gradient is the inverse gather when ``order`` is a permutation of all layers
  (training), instead of the generic scatter-add XLA would emit; a shorter (pruned)
  order scatters into zeros."""
  return jax.tree.map(lambda a: jnp.take(a, order, axis=0), stack)


def _permute_fwd(stack, order):
  return permute_layers(stack, order), (order, jax.tree.map(lambda a: a.shape[0], stack))


def _unpermute(g, order, sizes):
  """Per-layer values in execution order (``g``, stacked) -> the stack's order: the inverse
  gather for a permutation of all layers, a scatter into zeros for a shorter order."""

  def back(g, n):
    if order.shape[0] == n:  # a permutation (orders are validated): invert it
      return jnp.take(g, jnp.argsort(order), axis=0)
    return jnp.zeros((n,) + g.shape[1:], g.dtype).at[order].add(g)

  return jax.tree.map(back, g, sizes)


def _permute_bwd(res, g):
  order, sizes = res
  return _unpermute(g, order, sizes), None


permute_layers.defvjp(_permute_fwd, _permute_bwd)


def _layer(stack, idx):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, idx, 0, keepdims=False), stack)


def _after(x, idx):
  """``idx``, made to depend on ``x``, so that a layer's weights are copied out of the stack
  only once ``x`` exists, and a backward copy is never merged with the forward's (which
  would keep every layer's copy alive). ``fetch_layers`` passes the previous layer's input:
  the copy for layer i then overlaps layer i-1's work (measured 2% faster at Ti/16, 32 px,
  than waiting for layer i's own input) and at most two copies are alive. Elsewhere
  ``optimization_barrier`` says this; XLA's CPU pipeline drops it, and its scheduler then
  copies every layer at the start and keeps them all (forward temporary memory 21.7 vs
  2.1 MiB at Ti/16, 32 px), so on CPU the dependency is a zero computed from x that the
  simplifier cannot see through (under data parallelism it costs a scalar reduction per
  layer, which is why other backends keep the barrier)."""
  if jax.default_backend() != "cpu":
    return jax.lax.optimization_barrier((x, idx))[1]
  bits = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32)
  return idx + jnp.minimum(jnp.abs(jax.lax.shift_right_arithmetic(bits, 31)), 0)


class _Saved:
  """A layer's pullback with its weights taken out (re-read from the stack when needed)."""

  def __init__(self, leaves, static):
    self.leaves, self.static = leaves, static


jax.tree_util.register_pytree_node(_Saved, lambda s: (s.leaves, s.static),
                                   lambda static, leaves: _Saved(list(leaves), static))


def fetch_layers(layer_fn, n):
  """``layer_fn(weights, shared, x, i, extras) -> (x, out)`` run for i < n on layer ``order[i]``.

  Each layer's weights are copied out of the stack as it is about to run, forward and again
  backward, and are not kept in between: the backward saves activations only. So a
  runtime order costs the plain model's memory plus about two layers (measured 1.02x at
  S/16, 1.04x at Ti/16 32 px), where ``permute_layers`` keeps a permuted copy of every
  layer through the step (1.09x, 1.15x); both take about the plain model's time.
  ``shared`` (the position table) gets the summed gradient, ``order`` and ``extras`` (flags,
  keys) none. Orders name each layer at most once (``order.check_order``)."""

  def run(stack, shared, x, order, extras):
    outs, prev = [], x
    for i in range(n):
      w = _layer(stack, _after(prev, order[i]))
      prev = x
      x, out = layer_fn(w, shared, x, i, extras)
      outs.append(out)
    return x, outs

  def fwd(stack, shared, x, order, extras):
    saved, outs, prev = [], [], x
    for i in range(n):
      w = _layer(stack, _after(prev, order[i]))
      prev = x
      (x, out), pullback = jax.vjp(lambda w, s, x: layer_fn(w, s, x, i, extras), w, shared, x)
      leaves, treedef = jax.tree.flatten(pullback)
      wl = jax.tree.leaves(w)
      # The pullback holds the weights it multiplies by (found by identity): drop them.
      slots = tuple(next((k for k, t in enumerate(wl) if t is leaf), -1) for leaf in leaves)
      saved.append(_Saved([None if s >= 0 else leaf for leaf, s in zip(leaves, slots)],
                          (treedef, slots)))
      outs.append(out)
    return (x, outs), (stack, order, saved)

  def bwd(res, g):
    stack, order, saved = res
    gx, gouts = g
    gws, gshared, prev = [], None, gx
    for i in reversed(range(n)):
      wl = jax.tree.leaves(_layer(stack, _after(prev, order[i])))
      prev = gx
      treedef, slots = saved[i].static
      pullback = jax.tree.unflatten(treedef, [wl[s] if s >= 0 else leaf
                                              for leaf, s in zip(saved[i].leaves, slots)])
      gw, gs, gx = pullback((gx, gouts[i]))
      gws.append(gw)
      gshared = gs if gshared is None else jax.tree.map(jnp.add, gshared, gs)
    # Gradients in execution order, stacked, then put in the stack's order (inverse gather).
    # Tried: writing each into a zero stack in place, which XLA allocates at the start of
    # the backward (+20 MiB at Ti/16, 32 px) for no gain in time.
    gstack = jax.tree.map(lambda *g: jnp.stack(g[::-1]), *gws)
    gstack = _unpermute(gstack, order, jax.tree.map(lambda a: a.shape[0], stack))
    return gstack, gshared, gx, None, None

  f = jax.custom_vjp(run)
  f.defvjp(fwd, bwd)
  return f


class Encoder(nn.Module):
  """Runs the stacked blocks in ``order``. The one place layers are executed."""
  depth: int
  block: Block
  impl: str = "fetch"
  remat: bool = False

  @nn.compact
  def __call__(self, x, order, active=None, train=False, capture=False):
    block = self.block.clone(parent=None)  # an unbound template: apply() is a pure function
    shared_table = None
    if block.variant == "position" and block.pos_table == "shared":
      shared_table = self.param("layer_pos_embedding", nn.initializers.normal(0.02),
                                (self.depth, block.pos_dim))

    def init_stack(rng):  # each layer initialised independently, stacked on axis 0
      keys = jax.random.split(rng, self.depth)
      emb0 = None if shared_table is None else shared_table[0]
      return jax.vmap(lambda k: block.init(k, x[:1], 0, emb0)["params"])(keys)

    stack = None if self.impl == "sequential" else self.param("encoderblock", init_stack)
    dropout_key = self.make_rng("dropout") if train and _uses_dropout(block) else None

    def run_block(params, x, position, table=shared_table, key=dropout_key):
      rngs = {} if key is None else {"dropout": jax.random.fold_in(key, position)}
      emb = None if table is None else table[position]
      return block.apply({"params": params}, x, position, emb, not train, rngs=rngs)

    def skip(x):  # LayerDrop: a skipped layer costs nothing and passes x through.
      return x, _no_pos_logits(block, x)

    def finish(layer, x, act):  # one position: the layer (or LayerDrop's skip) and its outputs
      y, pos_logits = layer(x) if active is None else jax.lax.cond(act, layer, skip, x)
      return y, {"pos_logits": pos_logits, "hidden": y if capture else None}

    def take(idx):
      return jax.tree.map(lambda a: jnp.asarray(a)[idx], stack)

    if self.impl == "switch":
      branches = [functools.partial(lambda l, x, p: run_block(take(l), x, p), l)
                  for l in range(self.depth)]
      apply_layer = lambda idx, x, p: jax.lax.switch(idx, branches, x, p)
    else:
      apply_layer = lambda idx, x, p: run_block(take(idx), x, p)

    def step(x, inputs, params=None):
      position, idx, act = inputs
      layer = ((lambda x: apply_layer(idx, x, position)) if params is None
               else (lambda x: run_block(params, x, position)))
      return finish(layer, x, act)

    if self.remat:
      step = jax.checkpoint(step)
    n = order.shape[0]
    positions = jnp.arange(n, dtype=jnp.int32)
    act = jnp.ones((n,), bool) if active is None else active

    if self.impl == "sequential":
      # The plain model, the measurement reference: separate parameters per layer
      # (encoderblock_0 ... encoderblock_{L-1}, as non-scanned big_vision), fixed order.
      # Its parameters are not stacked: convert with ``unstack``.
      outs = []
      for i in range(n):
        p = self.param(f"encoderblock_{i}", lambda rng: block.init(rng, x[:1], 0, None)["params"])
        y, pos_logits = run_block(p, x, i)
        x = y if active is None else jnp.where(act[i], y, x)
        outs.append({"pos_logits": pos_logits, "hidden": x if capture else None})
      return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    # 'fetch' and 'permute' are training paths. Without training a forward needs no gradient,
    # and indexing the stack inside the scan avoids copies (measured faster; same arithmetic).
    if self.impl == "permute" and train:
      perm = permute_layers(stack, order)
      # Split, not a[i]: the gradient of a split is one concatenate, while the gradients of
      # L static slices are L zero-padded full stacks summed (O(L^2) traffic).
      parts = jax.tree.map(lambda a: [jnp.squeeze(p, 0) for p in jnp.split(a, n, axis=0)], perm)
      layers = [jax.tree.map(lambda _, ps: ps[i], stack, parts,
                             is_leaf=lambda t: isinstance(t, list)) for i in range(n)]
      outs = []
      for i in range(n):
        x, out = step(x, (i, i, act[i]), layers[i])
        outs.append(out)
      aux = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else {}
      return x, aux
    if self.impl == "fetch" and train:
      # The position table and dropout key go in as arguments: a custom gradient must not
      # close over them.
      def layer_fn(w, table, x, i, extras):
        act, key = extras
        layer = lambda x: run_block(w, x, i, table, key)
        return finish(jax.checkpoint(layer) if self.remat else layer, x, act[i])

      x, outs = fetch_layers(layer_fn, n)(stack, shared_table, x, order, (act, dropout_key))
      return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    if self.impl == "unrolled":  # a Python loop over positions fetching order[i] by dynamic index
      outs = []
      for i in range(n):
        x, out = step(x, (i, order[i], act[i]))
        outs.append(out)
      aux = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else {}
      return x, aux
    return jax.lax.scan(step, x, (positions, order, act))


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
      if images.ndim == 4 and images.shape[1] == self.channels and images.shape[-1] != self.channels:
        hint = " (looks channels-first: transpose to NHWC)"
      raise ValueError(f"expected images of shape [batch, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                       f"got {tuple(images.shape)}{hint}; resize the input or set the model's "
                       f"image_size/channels")

  @nn.compact
  def __call__(self, images, order=None, *, train=False, active=None, capture=False):
    self.check_images(images)
    if self.variant not in order_lib.VARIANTS:
      raise ValueError(f"unknown variant {self.variant!r}; choose one of {order_lib.VARIANTS}")
    if self.impl not in IMPLS:
      raise ValueError(f"unknown impl {self.impl!r}; choose one of {IMPLS} (see BENCHMARKS.md)")
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
    if self.impl == "sequential" and (
        order.shape[0] != self.depth or
        (not isinstance(order, jax.core.Tracer) and (np.asarray(order) != np.arange(self.depth)).any())):
      raise ValueError("impl='sequential' runs the original order only; use impl='gather' for others")

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
    x = nn.Dropout(self.dropout)(x + pos.astype(self.dtype), not train)
    embedded = x

    block = Block(mlp_dim=self.mlp_dim, num_heads=self.num_heads, depth=self.depth,
                  variant=self.variant, pos_dim=self.pos_dim, pos_table=self.pos_table,
                  dropout=self.dropout, attn_dropout=self.attn_dropout, ln_eps=self.ln_eps,
                  attention=self.attention, dtype=self.dtype, parent=None)
    x, aux = Encoder(self.depth, block, self.impl, self.remat, name="Transformer")(
        x, order, active, train, capture)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="encoder_norm")(x)

    head_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.xavier_uniform()
    head = functools.partial(nn.Dense, self.num_classes, kernel_init=head_init, dtype=self.dtype)
    logits = head(name="head")(x[:, 0]).astype(jnp.float32)
    if self.distilled:  # inference logits average both heads, as HF ...WithTeacher does
      logits = (logits + head(name="head_dist")(x[:, 1]).astype(jnp.float32)) / 2
    out = {"logits": logits}
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


def build(cfg) -> ViT:
  """A ViT from a config dict: optional ``name`` ('B/16') plus any ViT field."""
  cfg = dict(cfg)
  kw = decode_variant(cfg.pop("name")) if cfg.get("name") else {}
  unknown = sorted(set(cfg) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f"unknown model config fields {unknown}; known: {sorted(MODEL_FIELDS)}")
  kw.update(cfg)
  if isinstance(kw.get("dtype"), str):
    kw["dtype"] = jnp.dtype(kw["dtype"])
  return ViT(**kw)


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
