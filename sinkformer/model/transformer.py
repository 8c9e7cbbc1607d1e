"""The decoder: LLaMA-style (RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases).

A NULL and its dense control share every shape; the only difference is the `Gate` passed at
apply time (see sinks.py): it keeps only the MLP's SwiGLU activations in
`[ones(G) | sinkmask(source)]` and, optionally, only the attention heads in a per-source head
mask (zeroing the others). Rows are packed: attention is causal *and* block-diagonal over `segment_ids`, and
`positions` restart at every document, so a document's logits do not depend on its neighbours.

Every parameter carries logical axis names (`logical_axes` metadata) that mesh.py maps to
device axes.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sinkformer.model import sinks

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Dims:
  """The model's static shape (hashable, so it can live in the graphdef)."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_backbone: int   # G; the dense control has the same width G + P, all always on
  num_sinks: int      # P
  rope_base: float
  norm_eps: float
  tie_embeddings: bool
  dtype: str          # compute dtype; parameters are always float32

  @classmethod
  def from_config(cls, cfg) -> Dims:
    fields = {f.name for f in dataclasses.fields(cls)} - {"num_sinks"}
    return cls(num_sinks=cfg.sinks.num, **{f: cfg.model[f] for f in fields})


def _linear(fan_in, fan_out, axes, m, rngs, std=0.02):
  return nnx.Linear(fan_in, fan_out, use_bias=False, dtype=DTYPES[m.dtype],
                    kernel_init=nnx.initializers.normal(std),
                    kernel_metadata={"logical_axes": axes}, rngs=rngs)


def _norm(m, rngs):
  return nnx.RMSNorm(m.d_model, epsilon=m.norm_eps, dtype=DTYPES[m.dtype],
                     scale_metadata={"logical_axes": ("norm",)}, rngs=rngs)


def rope(x, positions, base: float):
  """Rotary embedding of x[B, T, H, hd] at integer positions[B, T] (rotate-half layout)."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq          # [B, T, hd/2]
  cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, m, rngs):
    self.m = m
    out_std = 0.02 / (2 * m.num_layers) ** 0.5
    self.q = _linear(m.d_model, m.num_heads * m.head_dim, ("embed", "heads"), m, rngs)
    self.k = _linear(m.d_model, m.num_kv_heads * m.head_dim, ("embed", "kv_heads"), m, rngs)
    self.v = _linear(m.d_model, m.num_kv_heads * m.head_dim, ("embed", "kv_heads"), m, rngs)
    self.o = _linear(m.num_heads * m.head_dim, m.d_model, ("heads", "embed"), m, rngs, out_std)

  def __call__(self, x, positions, segment_ids, heads_on=None, cache=None):
    """cache: None (packed rows), or (k[B, S, Hkv, hd], v, Cache) for decoding: the new
    tokens' keys/values are written at cache.index and queries attend to every valid slot
    up to their own. Returns the output, and the updated (k, v) when decoding."""
    m, (b, t, _) = self.m, x.shape
    q = rope(self.q(x).reshape(b, t, m.num_heads, m.head_dim), positions, m.rope_base)
    k = rope(self.k(x).reshape(b, t, m.num_kv_heads, m.head_dim), positions, m.rope_base)
    v = self.v(x).reshape(b, t, m.num_kv_heads, m.head_dim)
    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      mask = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])   # pad sees pad
    else:
      k_all, v_all, c = cache
      k = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (0, c.index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (0, c.index, 0, 0))
      query = c.index + jnp.arange(t)[:, None]
      key = jnp.arange(k.shape[1])[None, :]
      # a padding query sees itself only (its output is never used; no empty softmax)
      mask = (c.valid[:, None, :] & (key <= query)) | (key == query)
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None])
    if heads_on is not None:
      out = jnp.where(heads_on[..., None], out, 0)
    out = self.o(out.reshape(b, t, m.num_heads * m.head_dim))
    return out if cache is None else (out, (k, v))


class MLP(nnx.Module):
  """SwiGLU of width I = G + P; only the units in `units_on[B, T, I]` pass, times `scale`."""

  def __init__(self, m, rngs):
    width = m.mlp_backbone + m.num_sinks
    out_std = 0.02 / (2 * m.num_layers) ** 0.5
    self.gate = _linear(m.d_model, width, ("embed", "mlp"), m, rngs)
    self.up = _linear(m.d_model, width, ("embed", "mlp"), m, rngs)
    self.down = _linear(width, m.d_model, ("mlp", "embed"), m, rngs, out_std)

  def __call__(self, x, units_on=None, scale=1.0):
    h = jax.nn.silu(self.gate(x)) * self.up(x)
    if units_on is not None:
      h = jnp.where(units_on, h * jnp.asarray(scale, h.dtype), 0)
    return self.down(h)


class Block(nnx.Module):

  def __init__(self, m, rngs):
    self.attn_norm, self.attn = _norm(m, rngs), Attention(m, rngs)
    self.mlp_norm, self.mlp = _norm(m, rngs), MLP(m, rngs)

  def __call__(self, x, positions, segment_ids, units_on, heads_on, scale, cache=None):
    attn = self.attn(self.attn_norm(x), positions, segment_ids, heads_on, cache)
    attn, kv = attn if cache is not None else (attn, None)
    x = x + attn
    x = x + self.mlp(self.mlp_norm(x), units_on, scale)
    return x if cache is None else (x, kv)


class Transformer(nnx.Module):
  """`model(tokens, positions, segment_ids, gate)` -> f32 logits [B, T, V]; gate None = dense."""

  def __init__(self, m, rngs: nnx.Rngs):
    self.m = m
    self.embed = nnx.Embed(m.vocab_size, m.d_model, dtype=DTYPES[m.dtype],
                           embedding_init=nnx.initializers.normal(0.02),
                           embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs)
    self.blocks = nnx.List([Block(m, rngs) for _ in range(m.num_layers)])
    self.final_norm = _norm(m, rngs)
    if not m.tie_embeddings:
      self.lm_head = _linear(m.d_model, m.vocab_size, ("embed", "vocab"), m, rngs)

  def __call__(self, tokens, positions, segment_ids, gate: sinks.Gate | None = None,
               cache: Cache | None = None, embeds=None):
    """Logits [B, T, V]; with a cache (decoding), (logits, updated cache). `embeds` [B, T, d]
    replaces the token embeddings (GCG differentiates through a one-hot prompt)."""
    x = self.features(tokens, positions, segment_ids, gate, cache, embeds)
    x, cache = x if cache is not None else (x, None)
    logits = self.embed.attend(x) if self.m.tie_embeddings else self.lm_head(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, cache)

  def features(self, tokens, positions, segment_ids, gate=None, cache=None, embeds=None):
    """The final-normed hidden states [B, T, d] (what the LM head reads; the router's
    embeddings)."""
    m = self.m
    x = self.embed(tokens) if embeds is None else embeds.astype(DTYPES[m.dtype])
    # One unit mask per distinct mask layer (one in all, unless masks are per-layer).
    units = heads = [None]
    scale = 1.0 if gate is None else gate.backbone_scale
    if gate is not None:
      layers = range(gate.mlp.shape[0])
      units = [sinks.mlp_units(gate, l, m.mlp_backbone) for l in layers]
      heads = [sinks.head_units(gate, l, m.num_heads) for l in layers]
    written = []
    for layer, block in enumerate(self.blocks):
      i = layer % len(units)
      kv = None if cache is None else (cache.k[layer], cache.v[layer], cache)
      x = block(x, positions, segment_ids, units[i], heads[i], scale, kv)
      if cache is not None:
        x, kv = x
        written.append(kv)
    x = self.final_norm(x)
    if cache is None:
      return x
    k, v = (jnp.stack(parts) for parts in zip(*written))
    return x, Cache(k, v, cache.valid, cache.index + tokens.shape[1])


class Cache(NamedTuple):
  """Decoding state: keys/values of every layer, which slots hold real tokens, and where the
  next tokens go. `valid` must already mark the slots being written."""
  k: jax.Array       # [L, B, S, Hkv, hd]
  v: jax.Array
  valid: jax.Array   # bool[B, S]
  index: jax.Array   # int32 scalar


def empty_cache(m: Dims, batch: int, length: int) -> Cache:
  shape = (m.num_layers, batch, length, m.num_kv_heads, m.head_dim)
  zeros = jnp.zeros(shape, DTYPES[m.dtype])
  return Cache(zeros, zeros, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def apply(graphdef, params, batch, gate=None, cache=None):
  """Pure forward pass over split state: the form every jitted function uses."""
  model = nnx.merge(graphdef, params)
  return model(batch["tokens"], batch["positions"], batch["segment_ids"], gate, cache,
               batch.get("embeds"))


def features(graphdef, params, batch, gate=None):
  """Final hidden states [B, T, d] of packed rows (see Transformer.features)."""
  model = nnx.merge(graphdef, params)
  return model.features(batch["tokens"], batch["positions"], batch["segment_ids"], gate)


def abstract(m):
  """(graphdef, abstract params, logical axes) without allocating a single weight."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))))
  axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(axes)


def init(m, seed: int):
  """Concrete parameters as a plain dict of arrays (call under jit to place them sharded)."""
  return nnx.to_pure_dict(nnx.split(Transformer(m, nnx.Rngs(seed)))[1])


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
