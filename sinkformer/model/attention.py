"""Causal attention over packed rows: block-diagonal over segment ids, grouped-query heads.

Backends (`model.attention`):
  xla     the reference: logits and a materialised [B, 1, T, T] mask through XLA. Every
          platform; decoding with a KV cache always uses it.
  pallas  the Pallas GPU flash kernel with segment ids (no mask, no saved logits); K/V heads
          are repeated to the query heads, which the kernel needs.
  splash  TPU splash attention with `SegmentIds`, grouped heads handled as multi-query
          attention per K/V head.
  auto    splash on TPU, pallas on GPU, xla elsewhere.
Padding (segment 0) attends only to padding, so no softmax row is empty. The kernels need
the length to be a multiple of their block; shorter rows are padded with segment 0, which
changes nothing for the real tokens. On a mesh the kernels run per shard (`shard_map`: rows
over data/fsdp, heads over tensor). On a CPU the Pallas kernels run in interpret mode, which
is what the tests use; configs refuse them there (`resolve`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sinkformer.errors import ConfigError
from sinkformer.parallel import mesh as mesh_lib

BACKENDS = ("xla", "pallas", "splash")
CHOICES = ("auto",) + BACKENDS
PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "pallas": ("gpu",), "splash": ("tpu",)}
AUTO = {"tpu": "splash", "gpu": "pallas"}


def resolve(choice: str, platform: str) -> str:
  """The backend `model.attention = choice` means on `platform` (cpu, gpu, tpu); a backend the
  platform lacks is an error naming the field and what works there."""
  if choice not in CHOICES:
    raise ConfigError("model.attention", f"{choice!r} is not one of {', '.join(CHOICES)}")
  if choice == "auto":
    return AUTO.get(platform, "xla")
  if platform not in PLATFORMS[choice]:
    works = [b for b in BACKENDS if platform in PLATFORMS[b]]
    raise ConfigError("model.attention", f"{choice!r} does not run on {platform}; use "
                      f"{' or '.join(works + ['auto'])}")
  return choice


def reference(q, k, v, mask):
  """q [B, T, H, hd], k/v [B, S, Hkv, hd], mask bool [B, T, S] -> [B, T, H, hd]."""
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None])


def packed(q, k, v, segment_ids, backend: str = "xla"):
  """Causal attention within each segment of packed rows (segment 0 = padding)."""
  if backend == "xla":
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool)) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return reference(q, k, v, mask)
  kernel = {"pallas": _pallas, "splash": _splash}[backend]
  block = 128
  t = q.shape[1]
  pad = -t % block
  if pad:   # kernels tile the length; padding is a segment of its own (0) and changes nothing
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, segment_ids = map(widen, (q, k, v, segment_ids))
  return _per_shard(kernel, q, k, v, segment_ids)[:, :t]


def _per_shard(kernel, q, k, v, segment_ids):
  """Run a kernel on each device's rows and heads: XLA cannot partition a custom call."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q, k, v, segment_ids)
  qkv = mesh_lib.spec(("batch", "length", "heads", None))
  rows = mesh_lib.spec(("batch", "length"))
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                       check_vma=False)(q, k, v, segment_ids)


def _interpret() -> bool:
  return jax.default_backend() == "cpu"


def _pallas(q, k, v, segment_ids):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x.astype(q.dtype), groups, axis=2) for x in (k, v))
  return gpu_attention.mha(q, k, v, segment_ids, sm_scale=q.shape[-1] ** -0.5, causal=True,
                           interpret=_interpret())


@functools.cache
def _splash_kernel(length: int, groups: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = min(512, length)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * groups)
  return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash(q, k, v, segment_ids):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  b, t, h, hd = q.shape
  hkv = k.shape[2]
  kernel = _splash_kernel(t, h // hkv, _interpret())
  # [B, Hkv, G, T, hd] queries against [B, Hkv, T, hd] keys: multi-query attention per K/V head
  qg = (q * hd ** -0.5).transpose(0, 2, 1, 3).reshape(b, hkv, h // hkv, t, hd)
  kg, vg = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))

  def row(q, k, v, seg):
    ids = splash.SegmentIds(seg, seg)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

  out = jax.vmap(row)(qg, kg, vg, segment_ids)
  return out.reshape(b, h, t, hd).transpose(0, 2, 1, 3)
