"""Per-source sink masks: the one idea that makes a model natively unlearnable.

A *pool* is a set of `size` units (MLP hidden units, or attention heads) of which each source
switches on `k`. The choice is a pure function of (seed, pool, layer, source id) computed with
jax.random inside the jitted step, so no per-source table exists and any int32 id works. A
training token of source `s` multiplies its MLP activations by `[ones(G) | sinkmask(s)]`, so the
sinks outside `sinkmask(s)` get exactly zero gradient from it.

Source id 0 means "no source" (padding, or text deliberately kept out of every sink): all of
its sinks are off, i.e. it sees the backbone only.

Masks are computed once per distinct document of a row (`[B, D, size]`) and gathered per token,
never per token and never for every source.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

MLP_SALT, ATTN_SALT = 0, 1  # separate pools drawn from one seed never correlate
MODES = ("train", "source", "backbone", "mlp-off", "dense")


@dataclasses.dataclass(frozen=True)
class Pool:
  size: int
  k: int


@dataclasses.dataclass(frozen=True)
class SinkSpec:
  """Static description of every gated pool (hashable: safe as a jit static argument)."""
  backbone: int            # G always-on MLP units
  mlp: Pool                # P sink units, k per source
  attn: Pool | None        # optional sink heads (the last `size` query heads)
  num_layers: int
  per_layer: bool          # a different mask in every layer (default: one mask for all)
  exact: bool              # exactly k on (default) or Bernoulli(k/size) per unit
  seed: int
  backbone_rescale: bool   # backbone mode scales backbone units by (G+k)/G

  @classmethod
  def from_config(cls, cfg) -> SinkSpec | None:
    """`None` for the dense control, which has no sinks."""
    if cfg.model.kind == "dense":
      return None
    s = cfg.sinks
    return cls(backbone=cfg.model.mlp_backbone, mlp=Pool(s.num, s.k),
               attn=Pool(s.attn_heads, s.attn_k) if s.attn_heads else None,
               num_layers=cfg.model.num_layers, per_layer=s.per_layer,
               exact=s.selection == "exact", seed=s.seed, backbone_rescale=s.backbone_rescale)

  @property
  def mask_layers(self) -> int:
    return self.num_layers if self.per_layer else 1


def _unit_bits(seed: int, salt: int, layer, source_id, size: int) -> jax.Array:
  """uint32[size] random words for one (layer, source).

  Built only from `fold_in` (a threefry hash of its inputs), so the words do not depend on
  `jax_threefry_partitionable` or the backend: the same id gives the same mask everywhere.
  """
  key = jax.random.key(seed, impl="threefry2x32")
  key = jax.random.fold_in(jax.random.fold_in(key, salt), layer)
  key = jax.random.fold_in(key, source_id)
  units = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(size, dtype=jnp.uint32))
  return jax.random.key_data(units)[:, 0]


def _distinct_keys(bits: jax.Array) -> jax.Array:
  """Replace the low bits of each word by the unit index, so no two units tie.

  The exactly-k rule becomes "keys <= the k-th smallest key": a value sort, ~8x faster on
  CPU than an argsort, and still exactly k units (ties broken by index).
  """
  index_bits = max(int(bits.shape[-1] - 1).bit_length(), 1)
  high = (bits >> index_bits) << index_bits
  return high | jnp.arange(bits.shape[-1], dtype=jnp.uint32)


def pool_mask(pool: Pool, seed: int, salt: int, exact: bool, source_ids, layer=0) -> jax.Array:
  """bool[..., size]: which units of `pool` each source id switches on (id 0: none)."""
  source_ids = jnp.asarray(source_ids, jnp.int32)

  def one(sid):
    bits = _unit_bits(seed, salt, layer, sid, pool.size)
    if exact:  # the k units with the smallest keys
      keys = _distinct_keys(bits)
      on = keys <= jnp.sort(keys)[pool.k - 1]
    else:
      threshold = jnp.uint32(min(int(pool.k / pool.size * 2**32), 2**32 - 1))
      on = bits < threshold
    return on & (sid != 0)

  flat = jax.vmap(one)(source_ids.reshape(-1))
  return flat.reshape(source_ids.shape + (pool.size,))


def _layer_masks(spec: SinkSpec, pool: Pool, salt: int, source_ids) -> jax.Array:
  """bool[Lm, ..., size] with Lm = num_layers if per-layer masks, else 1."""
  return jnp.stack([pool_mask(pool, spec.seed, salt, spec.exact, source_ids, layer)
                    for layer in range(spec.mask_layers)])


def sink_mask(spec: SinkSpec, source_ids, layer: int = 0) -> jax.Array:
  """bool[..., P]: the MLP sinks of each source in `layer` (the public name of the mask)."""
  return pool_mask(spec.mlp, spec.seed, MLP_SALT, spec.exact, source_ids,
                   layer if spec.per_layer else 0)


class Exclusion(NamedTuple):
  """Units zeroed in every forward pass whatever source is active (unlearned sources)."""
  mlp: jax.Array           # bool[Lm, P]
  attn: jax.Array | None   # bool[Lm, Ha]


def exclusion(spec: SinkSpec, source_ids) -> Exclusion:
  """The union of the given sources' units; an empty list excludes nothing."""
  ids = jnp.asarray(source_ids, jnp.int32).reshape(-1)
  union = lambda pool, salt: _layer_masks(spec, pool, salt, ids).any(axis=1)
  return Exclusion(union(spec.mlp, MLP_SALT),
                   union(spec.attn, ATTN_SALT) if spec.attn else None)


class Gate(NamedTuple):
  """What the model needs to gate its pools for one batch (a pytree: an ordinary jit argument)."""
  mlp: jax.Array            # bool[Lm, B, D, P] sinks on, per document slot
  attn: jax.Array | None    # bool[Lm, B, D, Ha]
  doc_index: jax.Array      # int32[B, T] document slot of each token
  backbone_scale: float | None  # multiplies the MLP's output units; None (= 1) except in
                                # backbone/mlp-off mode, where the units on are the backbone


def doc_sources(source_ids, segment_ids, max_docs: int) -> jax.Array:
  """int32[B, D]: the source of each document slot of a packed row (slot = segment id)."""
  rows = jnp.arange(source_ids.shape[0])[:, None]
  return jnp.zeros((source_ids.shape[0], max_docs), jnp.int32).at[rows, segment_ids].max(
      source_ids, mode="drop")


def make_gate(spec: SinkSpec, mode: str, *, segment_ids, source_ids=None, row_sources=None,
              exclude: Exclusion | None = None, max_docs: int = 1) -> Gate:
  """Build the gate of one apply `mode` (see MODES); no mode recompiles per source.

  train:    each token uses its own `source_ids` (packed rows: one mask per segment).
  source:   every token of row b uses `row_sources[b]` (explicit ids, e.g. a routed query).
  backbone: all sinks off; backbone units scaled by (G+k)/G if `spec.backbone_rescale`.
  mlp-off:  every MLP unit off, backbone too (a diagnostic: what attention and embeddings
            alone know).
  `exclude` zeroes its units in every mode.
  """
  batch = segment_ids.shape[0]
  scale = None
  needed = {"train": source_ids, "source": row_sources}
  if mode in needed and needed[mode] is None:
    raise ValueError(f"sink mode {mode!r} needs "
                     f"{'source_ids' if mode == 'train' else 'row_sources'}")
  if mode == "train":
    doc_src, doc_index = doc_sources(source_ids, segment_ids, max_docs), segment_ids
  elif mode == "source":
    doc_src, doc_index = jnp.asarray(row_sources, jnp.int32)[:, None], jnp.zeros_like(segment_ids)
  elif mode in ("backbone", "mlp-off"):
    doc_src, doc_index = jnp.zeros((batch, 1), jnp.int32), jnp.zeros_like(segment_ids)
    if mode == "mlp-off":   # sinks are off already; the scale turns the backbone off
      scale = 0.0
    elif spec.backbone_rescale:
      scale = (spec.backbone + spec.mlp.k) / spec.backbone
  else:
    raise ValueError(f"unknown sink mode {mode!r}; expected one of {MODES[:4]}")

  def masks(pool, salt, excluded):
    m = _layer_masks(spec, pool, salt, doc_src)
    return m if excluded is None else m & ~excluded[:, None, None, :]

  return Gate(mlp=masks(spec.mlp, MLP_SALT, exclude.mlp if exclude else None),
              attn=masks(spec.attn, ATTN_SALT, exclude.attn if exclude else None)
              if spec.attn else None,
              doc_index=doc_index, backbone_scale=scale)


def _per_token(doc_masks, layer: int, doc_index) -> jax.Array:
  m = doc_masks[layer]                                                  # [B, D, size]
  return jnp.take_along_axis(m, doc_index[..., None], axis=1)            # [B, T, size]


# The MLP gate is a 0/1 multiplier [B, T, I] in the compute dtype, applied to the gate
# projection before SwiGLU's silu (silu(0) = 0, so the unit's activation and every gradient
# through it are exactly 0), materialised once per mask layer (optimization_barrier: left
# to fusion, XLA recomputes the gather inside every layer, forward and backward). On the
# quickstart's CPU step this costs ~0.5% against 9% for masking the activation after SwiGLU
# (`where` or multiply), whose backward XLA:CPU splits into extra transposed copies.

def mlp_units(gate: Gate, layer: int, backbone: int, dtype=jnp.float32) -> jax.Array:
  """[B, T, G + P] 0/1 multiplier: `[ones(G) | sinkmask(source of token)]` for mask layer
  `layer`."""
  sinks = _per_token(gate.mlp, layer, gate.doc_index)
  ones = jnp.ones(sinks.shape[:-1] + (backbone,), bool)
  return jax.lax.optimization_barrier(jnp.concatenate([ones, sinks], axis=-1).astype(dtype))


def head_units(gate: Gate, layer: int, num_heads: int) -> jax.Array | None:
  """bool[B, T, H]: backbone heads on, the last Ha (sink) heads by the source's mask."""
  if gate.attn is None:
    return None
  sinks = _per_token(gate.attn, layer, gate.doc_index)
  ones = jnp.ones(sinks.shape[:-1] + (num_heads - sinks.shape[-1],), bool)
  return jax.lax.optimization_barrier(jnp.concatenate([ones, sinks], axis=-1))
