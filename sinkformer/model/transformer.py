"""The decoder: LLaMA-style (RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases).

A NULL and its dense control share every shape; the only difference is the `Gate` passed at
apply time (see sinks.py): it keeps only the MLP's SwiGLU activations in
`[ones(G) | sinkmask(source)]` and, optionally, only the attention heads in a per-source head
mask (zeroing the others). Rows are packed: attention is causal *and* block-diagonal over
`segment_ids`, and `positions` restart at every document, so a document's logits do not
depend on its neighbours.

The blocks are one stack: every block parameter has a leading `layers` axis, and the blocks
run under `jax.lax.scan` (`scan_layers`), so compile time does not grow with depth; each
block is rematerialised by the `remat` policy. The decoding KV cache `[L, B, S, Hkv, hd]`
is carried through the scan and written in place, a token at a time.

Every parameter carries logical axis names (`logical_axes` metadata) that parallel/mesh.py
maps to device axes; activations are constrained at block boundaries the same way.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sinkformer.errors import ConfigError
from sinkformer.model import attention as attention_lib
from sinkformer.model import sinks
from sinkformer.parallel import mesh as mesh_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a rematerialised block keeps for the backward pass; the rest is recomputed.
REMAT = {
    "none": None,                                                      # keep everything
    "full": jax.checkpoint_policies.nothing_saveable,                  # keep the block input only
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection outputs
}


@dataclasses.dataclass(frozen=True)
class Dims:
  """The model's static shape and how it runs (hashable, so it can live in the graphdef)."""
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
  attention: str = "xla"      # a resolved backend of attention.BACKENDS
  remat: str = "none"         # a policy of REMAT
  scan_layers: bool = True    # False: a Python loop over the same stacked parameters
  platform: str = "cpu"       # what it is built for (cpu, gpu, tpu): kernels interpret on cpu

  @classmethod
  def from_config(cls, cfg, platform: str | None = None) -> Dims:
    """`platform` resolves `model.attention` (default: this process's backend)."""
    if cfg.model.remat not in REMAT:
      raise ConfigError("model.remat", f"{cfg.model.remat!r} is not one of {', '.join(REMAT)}")
    static = {"attention", "remat", "scan_layers", "platform"}
    fields = {f.name for f in dataclasses.fields(cls)} - {"num_sinks"} - static
    platform = platform or jax.default_backend()
    return cls(num_sinks=cfg.sinks.num, **{f: cfg.model[f] for f in fields},
               attention=attention_lib.resolve(cfg.model.attention, platform),
               remat=cfg.model.remat, scan_layers=cfg.model.scan_layers, platform=platform)


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

  def __call__(self, x, positions, segment_ids, heads_on=None, cache=None, layer=None):
    """cache: None (packed rows), or the decoding Cache, whose layer `layer` gets the new
    tokens' keys/values at cache.index; queries attend to every valid slot up to their own.
    Returns the output, and the updated cache when decoding."""
    m, (b, t, _) = self.m, x.shape
    q = rope(self.q(x).reshape(b, t, m.num_heads, m.head_dim), positions, m.rope_base)
    k = rope(self.k(x).reshape(b, t, m.num_kv_heads, m.head_dim), positions, m.rope_base)
    v = self.v(x).reshape(b, t, m.num_kv_heads, m.head_dim)
    if cache is None:
      out = attention_lib.packed(q, k, v, segment_ids, m.attention, m.platform)
    else:
      at = (layer, 0, cache.index, 0, 0)
      cache = cache._replace(k=jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at),
                             v=jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at))
      k_all, v_all = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False)
                      for c in (cache.k, cache.v))
      query = cache.index + jnp.arange(t)[:, None]
      key = jnp.arange(k_all.shape[1])[None, :]
      # a padding query sees itself only (its output is never used; no empty softmax)
      out = attention_lib.reference(q, k_all, v_all,
                                    (cache.valid[:, None, :] & (key <= query)) | (key == query))
    if heads_on is not None:
      out = jnp.where(heads_on[..., None], out, 0)
    out = self.o(out.reshape(b, t, m.num_heads * m.head_dim))
    return out if cache is None else (out, cache)


class MLP(nnx.Module):
  """SwiGLU of width I = G + P; a unit whose `units[B, T, I]` is 0 (a sink that is off)
  passes nothing and gets no gradient; `scale` multiplies every unit's activation."""

  def __init__(self, m, rngs):
    width = m.mlp_backbone + m.num_sinks
    out_std = 0.02 / (2 * m.num_layers) ** 0.5
    self.gate = _linear(m.d_model, width, ("embed", "mlp"), m, rngs)
    self.up = _linear(m.d_model, width, ("embed", "mlp"), m, rngs)
    self.down = _linear(width, m.d_model, ("mlp", "embed"), m, rngs, out_std)

  def __call__(self, x, units=None, scale=None):
    g = self.gate(x)
    if units is not None:   # silu(0) = 0: the unit is off (see sinks.mlp_units)
      g = g * units
    h = jax.nn.silu(g) * self.up(x)
    if scale is not None:
      h = h * jnp.asarray(scale, h.dtype)
    return self.down(h)


class Block(nnx.Module):

  def __init__(self, m, rngs):
    self.attn_norm, self.attn = _norm(m, rngs), Attention(m, rngs)
    self.mlp_norm, self.mlp = _norm(m, rngs), MLP(m, rngs)

  def __call__(self, x, positions, segment_ids, units, heads_on, scale, cache=None, layer=None):
    attn = self.attn(self.attn_norm(x), positions, segment_ids, heads_on, cache, layer)
    attn, cache = attn if cache is not None else (attn, None)
    x = x + attn
    x = x + self.mlp(self.mlp_norm(x), units, scale)
    x = mesh_lib.constrain(x, ("batch", "length", "act_embed"))
    return x, cache


def _blocks(m, rngs):
  """One Block whose parameters are stacked over a leading `layers` axis."""
  @nnx.split_rngs(splits=m.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return Block(m, rngs)
  return make(rngs)


class Transformer(nnx.Module):
  """`model(tokens, positions, segment_ids, gate)` -> f32 logits [B, T, V]; gate None = dense."""

  def __init__(self, m, rngs: nnx.Rngs):
    self.m = m
    self.embed = nnx.Embed(m.vocab_size, m.d_model, dtype=DTYPES[m.dtype],
                           embedding_init=nnx.initializers.normal(0.02),
                           embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs)
    self.blocks = _blocks(m, rngs)
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
    logits = mesh_lib.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits if cache is None else (logits, cache)

  def features(self, tokens, positions, segment_ids, gate=None, cache=None, embeds=None):
    """The final-normed hidden states [B, T, d] (what the LM head reads; the router's
    embeddings)."""
    m = self.m
    x = self.embed(tokens) if embeds is None else embeds.astype(DTYPES[m.dtype])
    x = mesh_lib.constrain(x, ("batch", "length", "act_embed"))
    dtype, scale = DTYPES[m.dtype], None if gate is None else gate.backbone_scale
    # Unit masks: built once when every layer shares the mask, else per layer inside the loop
    # from that layer's per-document masks (never [L, B, T, I] at once).
    shared = gate is not None and gate.mlp.shape[0] == 1
    per_layer = gate if gate is not None and not shared else None
    units, heads = ((sinks.mlp_units(gate, 0, m.mlp_backbone, dtype),
                     sinks.head_units(gate, 0, m.num_heads)) if shared else (None, None))
    graphdef, layers = nnx.split(self.blocks)

    def body(carry, xs):
      x, cache = carry
      params, layer, masks = xs
      u, h = units, heads
      if masks is not None:
        g = per_layer._replace(mlp=masks[0][None], attn=None if masks[1] is None else masks[1][None])
        u, h = sinks.mlp_units(g, 0, m.mlp_backbone, dtype), sinks.head_units(g, 0, m.num_heads)
      x, cache = nnx.merge(graphdef, params)(x, positions, segment_ids, u, h, scale, cache,
                                             layer)
      return (x, cache), None

    if cache is None and REMAT[m.remat] is not None:
      body = jax.checkpoint(body, policy=REMAT[m.remat], prevent_cse=not m.scan_layers)
    masks = None if per_layer is None else (per_layer.mlp, per_layer.attn)
    xs = (layers, jnp.arange(m.num_layers), masks)
    if m.scan_layers:
      (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
    else:   # the same parameters and body, unrolled: the compile-time baseline
      for layer in range(m.num_layers):
        (x, cache), _ = body((x, cache), jax.tree.map(lambda a: a[layer], xs))
    x = self.final_norm(x)
    if cache is None:
      return x
    return x, cache._replace(index=cache.index + tokens.shape[1])


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
  """(graphdef, abstract params, logical axes) without allocating a single weight. Block
  parameters get the leading `layers` axis."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))))
  axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                                       is_leaf=lambda v: isinstance(v, nnx.Variable)))
  axes["blocks"] = jax.tree.map(lambda a: ("layers",) + a, axes["blocks"],
                                is_leaf=lambda x: isinstance(x, tuple))
  return graphdef, nnx.to_pure_dict(state), axes


def backbone_units(m, sink_heads: int = 0) -> dict:
  """A tree like the parameters, broadcastable to each: 1 on the backbone (everything a
  source's mask never switches off), 0 on the MLP's sink units (columns G.. of gate/up, rows
  G.. of down) and on the last `sink_heads` query heads (their q columns and o rows)."""
  _, params, _ = abstract(m)
  ones = jax.tree.map(lambda p: np.ones((1,) * p.ndim, np.float32), params)
  units = np.r_[np.ones(m.mlp_backbone), np.zeros(m.num_sinks)].astype(np.float32)
  heads = np.repeat(np.r_[np.ones(m.num_heads - sink_heads), np.zeros(sink_heads)],
                    m.head_dim).astype(np.float32)
  mlp, attn = ones["blocks"]["mlp"], ones["blocks"]["attn"]
  mlp["gate"]["kernel"] = mlp["up"]["kernel"] = units[None, None, :]   # [L, d, I]
  mlp["down"]["kernel"] = units[None, :, None]                         # [L, I, d]
  attn["q"]["kernel"] = heads[None, None, :]
  attn["o"]["kernel"] = heads[None, :, None]
  return ones


def init(m, seed: int):
  """Concrete parameters as a plain dict of arrays (call under jit to place them sharded)."""
  return nnx.to_pure_dict(nnx.split(Transformer(m, nnx.Rngs(seed)))[1])


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
