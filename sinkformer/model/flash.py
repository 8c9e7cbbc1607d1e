"""Flash attention for packed rows on GPUs, in Pallas (Triton): causal, block-diagonal over
documents, grouped-query heads read in place.

q [B, T, H, D] attends to k, v [B, T, Hkv, D] (H = G * Hkv; query head h reads K/V head
h // G, never a repeated copy) where the segment ids [B, T] are equal and the key is not
after the query. Three kernels, each a loop over blocks (FlashAttention-2):
  forward   per (query block, row, query head): over K/V blocks; saves the log-sum-exp;
  dK, dV    per (K/V block, row, K/V head): over the G query heads of that K/V head and
            their query blocks, so a K/V head's gradient is summed in the kernel;
  dQ        per (query block, row, query head): over K/V blocks.
Each loop visits only the blocks that can hold a pair in one document (`block_ranges`): a
query block needs no K/V block before the first position of any of its tokens' documents,
and a K/V block no query block after the last position of any of its tokens' documents.
In a packed row of D documents that skips all but ~1/D of the causal work. Masks are
applied per element inside visited blocks, so any layout of segment ids is exact (the
ranges are only tight when each document is contiguous, as packing makes them). A query
always sees itself, so no softmax row is empty.

Block sizes and warps come from a table per head dim (`block_sizes`): starting points for
Hopper, to be measured with `sinkformer bench attention` on the GPU. On a CPU the kernels
run in Pallas' interpret mode (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (queries x keys) and Triton settings of the three kernels."""
  fwd: tuple[int, int]
  dkv: tuple[int, int]
  dq: tuple[int, int]
  warps: int
  stages: int


# head_dim -> blocks, after the FlashAttention-2 Triton kernels' Hopper settings: wide query
# tiles forward and for dQ, wide key tiles for dK/dV, 8 warps once a tile row is 128 wide.
TABLE = {64: Blocks((128, 64), (32, 128), (128, 32), 4, 3),
         128: Blocks((128, 64), (32, 128), (128, 32), 8, 3),
         256: Blocks((64, 32), (16, 64), (64, 16), 8, 2)}


def block_sizes(head_dim: int, length: int) -> Blocks:
  """The table's blocks for `head_dim` (the next size up), none longer than `length`."""
  key = min((d for d in TABLE if d >= head_dim), default=max(TABLE))
  b = TABLE[key]
  fit = lambda pair: tuple(min(x, length) for x in pair)
  return dataclasses.replace(b, fwd=fit(b.fwd), dkv=fit(b.dkv), dq=fit(b.dq))


def block_ranges(segment_ids, block_q: int, block_k: int):
  """(first K/V block per query block [B, T/block_q], end (exclusive) query block per K/V
  block [B, T/block_k]) that can hold a same-document pair, from the first and last
  position of each token's segment id."""
  b, t = segment_ids.shape
  pos = jnp.arange(t, dtype=jnp.int32)
  ids = jnp.clip(segment_ids, 0, t)
  first = jax.vmap(lambda s: jax.ops.segment_min(pos, s, num_segments=t + 1))(ids)
  last = jax.vmap(lambda s: jax.ops.segment_max(pos, s, num_segments=t + 1))(ids)
  first = jnp.take_along_axis(first, ids, 1)   # of each token's document
  last = jnp.take_along_axis(last, ids, 1)
  kv_from = first.reshape(b, t // block_q, block_q).min(-1) // block_k
  q_to = last.reshape(b, t // block_k, block_k).max(-1) // block_q + 1
  return kv_from.astype(jnp.int32), q_to.astype(jnp.int32)


def visited(segment_ids, block_q: int, block_k: int) -> float:
  """The fraction of the causal forward's blocks the kernel visits (for benchmarks)."""
  kv_from, _ = block_ranges(segment_ids, block_q, block_k)
  n = segment_ids.shape[1] // block_q
  causal_end = -(-(jnp.arange(n) + 1) * block_q // block_k)
  return float((causal_end - kv_from).sum() / (causal_end.sum() * segment_ids.shape[0]))


def _scores(q, k, seg_q, seg_k, span_q, span_k, scale):
  """Masked logits in base 2: log2(e) * scale * q.k where same document and not after."""
  s = plgpu.dot(q, k.T) * (scale * LOG2E)
  keep = (seg_q[:, None] == seg_k[None, :]) & (span_q[:, None] >= span_k[None, :])
  return jnp.where(keep, s, MASKED)


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, kv_from_ref, o_ref, lse_ref, *, scale,
                    block_q, block_k):
  i = pl.program_id(0)
  q = plgpu.load(q_ref)
  rows = pl.ds(i * block_q, block_q)
  seg_q, span_q = seg_ref[rows], i * block_q + jnp.arange(block_q)

  def body(j, carry):
    o, m, l = carry
    cols = pl.ds(j * block_k, block_k)
    s = _scores(q, plgpu.load(k_ref.at[cols, :]), seg_q, seg_ref[cols], span_q,
                j * block_k + jnp.arange(block_k), scale)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp2(s - m_new[:, None])
    fix = jnp.exp2(m - m_new)
    v = plgpu.load(v_ref.at[cols, :])
    return fix[:, None] * o + plgpu.dot(p.astype(v.dtype), v), m_new, fix * l + p.sum(-1)

  end = lax.div((i + 1) * block_q + block_k - 1, block_k)   # causal
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full(block_q, -jnp.inf, jnp.float32),
          jnp.zeros(block_q, jnp.float32))
  o, m, l = lax.fori_loop(kv_from_ref[i], end, body, init)
  lse_ref[...] = m + jnp.log2(l)
  plgpu.store(o_ref, (o / l[:, None]).astype(o_ref.dtype))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, q_to_ref, dk_ref,
                dv_ref, *, scale, block_q, block_k, groups):
  j = pl.program_id(0)
  cols = pl.ds(j * block_k, block_k)
  k, v = plgpu.load(k_ref), plgpu.load(v_ref)
  seg_k, span_k = seg_ref[cols], j * block_k + jnp.arange(block_k)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for h in range(groups):   # the query heads that read this K/V head
    head = jnp.int32(h)

    def body(i, carry):
      dk, dv = carry
      rows = pl.ds(i * block_q, block_q)
      q = plgpu.load(q_ref.at[rows, head, :])
      do = plgpu.load(do_ref.at[rows, head, :])
      s = _scores(q, k, seg_ref[rows], seg_k, i * block_q + jnp.arange(block_q), span_k, scale)
      p = jnp.exp2(s - lse_ref[head, rows][:, None])
      dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
      ds = p * (plgpu.dot(do, v.T) - delta_ref[head, rows][:, None]) * scale
      return dk + plgpu.dot(ds.astype(q.dtype).T, q), dv

    dk, dv = lax.fori_loop(lax.div(j * block_k, block_q), q_to_ref[j], body, (dk, dv))
  plgpu.store(dk_ref, dk.astype(dk_ref.dtype))
  plgpu.store(dv_ref, dv.astype(dv_ref.dtype))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, kv_from_ref, dq_ref, *,
               scale, block_q, block_k):
  i = pl.program_id(0)
  q, do = plgpu.load(q_ref), plgpu.load(do_ref)
  rows = pl.ds(i * block_q, block_q)
  seg_q, span_q = seg_ref[rows], i * block_q + jnp.arange(block_q)
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq):
    cols = pl.ds(j * block_k, block_k)
    k, v = plgpu.load(k_ref.at[cols, :]), plgpu.load(v_ref.at[cols, :])
    s = _scores(q, k, seg_q, seg_ref[cols], span_q, j * block_k + jnp.arange(block_k), scale)
    ds = jnp.exp2(s - lse[:, None]) * (plgpu.dot(do, v.T) - delta[:, None]) * scale
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  end = lax.div((i + 1) * block_q + block_k - 1, block_k)
  dq = lax.fori_loop(kv_from_ref[i], end, body, jnp.zeros(q.shape, jnp.float32))
  plgpu.store(dq_ref, dq.astype(dq_ref.dtype))


def _call(kernel, grid, in_specs, out_specs, out_shape, blocks: Blocks, interpret: bool, name):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret, name=name,
                        compiler_params=plgpu.CompilerParams(num_warps=blocks.warps,
                                                             num_stages=blocks.stages))


def _forward(q, k, v, segment_ids, interpret):
  b, t, h, d = q.shape
  groups = h // k.shape[2]
  blocks = block_sizes(d, t)
  bq, bk = blocks.fwd
  kv_from, _ = block_ranges(segment_ids, bq, bk)
  full = pl.BlockSpec((None, t, None, d), lambda i, r, n: (r, 0, n // groups, 0))
  out, lse = _call(
      functools.partial(_forward_kernel, scale=d ** -0.5, block_q=bq, block_k=bk),
      (t // bq, b, h),
      [pl.BlockSpec((None, bq, None, d), lambda i, r, n: (r, i, n, 0)), full, full,
       pl.BlockSpec((None, t), lambda i, r, n: (r, 0)),
       pl.BlockSpec((None, t // bq), lambda i, r, n: (r, 0))],
      [pl.BlockSpec((None, bq, None, d), lambda i, r, n: (r, i, n, 0)),
       pl.BlockSpec((None, None, bq), lambda i, r, n: (r, n, i))],
      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      blocks, interpret, "flash_forward")(q, k, v, segment_ids, kv_from)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, k, v, segment_ids, interpret: bool = False):
  """Causal attention within each segment: q [B, T, H, D], k/v [B, T, Hkv, D] (H a multiple
  of Hkv), segment_ids [B, T] -> [B, T, H, D]. T must be a multiple of the blocks (128 is)."""
  return _forward(q, k, v, segment_ids, interpret)[0]


def _attention_fwd(q, k, v, segment_ids, interpret):
  out, lse = _forward(q, k, v, segment_ids, interpret)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(interpret, res, do):
  q, k, v, segment_ids, out, lse = res
  b, t, h, d = q.shape
  hkv = k.shape[2]
  groups = h // hkv
  blocks = block_sizes(d, t)
  scale = d ** -0.5
  do = do.astype(q.dtype)
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  seg_spec = pl.BlockSpec((None, t), lambda i, r, n: (r, 0))

  bq, bk = blocks.dkv
  _, q_to = block_ranges(segment_ids, bq, bk)
  group = pl.BlockSpec((None, t, groups, d), lambda j, r, g: (r, 0, g, 0))
  tile = pl.BlockSpec((None, bk, None, d), lambda j, r, g: (r, j, g, 0))
  stats = pl.BlockSpec((None, groups, t), lambda j, r, g: (r, g, 0))
  dk, dv = _call(
      functools.partial(_dkv_kernel, scale=scale, block_q=bq, block_k=bk, groups=groups),
      (t // bk, b, hkv),
      [group, tile, tile, group, stats, stats, seg_spec,
       pl.BlockSpec((None, t // bk), lambda j, r, g: (r, 0))],
      [tile, tile], [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      blocks, interpret, "flash_dkv")(q, k, v, do, lse, delta, segment_ids, q_to)

  bq, bk = blocks.dq
  kv_from, _ = block_ranges(segment_ids, bq, bk)
  rows = pl.BlockSpec((None, bq, None, d), lambda i, r, n: (r, i, n, 0))
  full = pl.BlockSpec((None, t, None, d), lambda i, r, n: (r, 0, n // groups, 0))
  stat = pl.BlockSpec((None, None, bq), lambda i, r, n: (r, n, i))
  dq = _call(
      functools.partial(_dq_kernel, scale=scale, block_q=bq, block_k=bk),
      (t // bq, b, h),
      [rows, full, full, rows, stat, stat, seg_spec,
       pl.BlockSpec((None, t // bq), lambda i, r, n: (r, 0))],
      rows, jax.ShapeDtypeStruct(q.shape, q.dtype), blocks, interpret,
      "flash_dq")(q, k, v, do, lse, delta, segment_ids, kv_from)
  return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)
