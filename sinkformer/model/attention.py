"""Causal attention over packed rows: block-diagonal over segment ids, grouped-query heads.

Backends (`model.attention`):
  xla     the reference: logits and a materialised [B, 1, T, T] mask through XLA. Every
          platform; decoding with a KV cache always uses it.
  pallas  our Pallas (Triton) flash kernel for GPUs (flash.py): K/V heads read in place,
          blocks that lie in other documents skipped, forward and backward.
  cudnn   cuDNN's fused attention on packed rows (per-segment lengths and offsets, causal
          within each), through jax's private cuDNN path. Needs jax >= 0.11.2 (earlier
          versions offset K/V by the query head count under grouped heads) and a GPU of
          compute capability 9.0 or newer; refused otherwise. Checked against xla by the
          GPU script only: it cannot even be lowered without a GPU.
  splash  TPU splash attention with `SegmentIds`, grouped heads handled as multi-query
          attention per K/V head.
  auto    splash on TPU, pallas on GPU (tested against xla in interpret mode and lowered for
          cuda in CI), xla elsewhere. On a GPU try pallas, then cudnn, then xla: pallas and
          xla are what the suite checks; cudnn may be faster on Hopper, which the GPU
          script measures.
Padding (segment 0) attends only to padding, so no softmax row is empty. The kernels need
the length to be a multiple of their block; shorter rows are padded with segment 0, which
changes nothing for the real tokens. On a mesh the kernels run per shard (`shard_map`: rows
over data/fsdp, heads over tensor). A backend is resolved for the platform the model is
built for, which need not be this process's (lowering for cuda or tpu on a CPU); the Pallas
kernels run in interpret mode when that platform is the CPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sinkformer.errors import ConfigError
from sinkformer.model import flash
from sinkformer.parallel import mesh as mesh_lib

BACKENDS = ("xla", "pallas", "cudnn", "splash")
CHOICES = ("auto",) + BACKENDS
PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "pallas": ("gpu",), "cudnn": ("gpu",),
             "splash": ("tpu",)}
AUTO = {"tpu": "splash", "gpu": "pallas"}
CUDNN_JAX = (0, 11, 2)


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
  if choice == "cudnn":
    _check_cudnn()
  return choice


def _check_cudnn():
  version = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())
  if version < CUDNN_JAX:
    raise ConfigError("model.attention", f"'cudnn' needs jax >= {'.'.join(map(str, CUDNN_JAX))} "
                      f"(earlier versions misplace K/V under grouped heads); this is jax "
                      f"{jax.__version__}: use pallas or xla")
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  capability = float(getattr(gpus[0], "compute_capability", 0) or 0) if gpus else 0.0
  if capability < 9.0:
    raise ConfigError("model.attention", "'cudnn' needs an NVIDIA GPU of compute capability "
                      f"9.0 or newer (Hopper); found {gpus[0].device_kind if gpus else 'none'}: "
                      "use pallas or xla")


def reference(q, k, v, mask):
  """q [B, T, H, hd], k/v [B, S, Hkv, hd], mask bool [B, T, S] -> [B, T, H, hd]."""
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None])


def packed(q, k, v, segment_ids, backend: str = "xla", platform: str | None = None):
  """Causal attention within each segment of packed rows (segment 0 = padding); `platform`
  is the one the backend was resolved for (default: this process's)."""
  if backend == "xla":
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool)) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return reference(q, k, v, mask)
  interpret = (platform or jax.default_backend()) == "cpu"
  kernel = {"pallas": functools.partial(_pallas, interpret=interpret), "cudnn": _cudnn,
            "splash": functools.partial(_splash, interpret=interpret)}[backend]
  block = 128
  t = q.shape[1]
  pad = -t % block
  if pad:   # kernels tile the length; padding is a segment of its own (0) and changes nothing
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, segment_ids = map(widen, (q, k, v, segment_ids))
  return _per_shard(kernel, q, k, v, segment_ids)[:, :t]


def _per_shard(kernel, q, k, v, segment_ids):
  """Run a kernel on each device's rows and heads: XLA cannot partition a custom call. The
  shard_map takes every axis still partitioned here (inside a shard_map over rows, each
  device already holds its own; TPU kernels need every axis manual, even of size 1)."""
  mesh = jax.sharding.get_abstract_mesh()
  free = mesh_lib.free_axes(include_trivial=True)
  if mesh.empty or mesh.size == 1 or not free:
    return kernel(q, k, v, segment_ids)
  qkv = mesh_lib.over(mesh_lib.spec(("batch", "length", "heads", None)), free)
  rows = mesh_lib.over(mesh_lib.spec(("batch", "length")), free)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                       axis_names=set(free), check_vma=False)(q, k, v, segment_ids)


def _pallas(q, k, v, segment_ids, interpret: bool):
  return flash.attention(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids, interpret)


def cudnn_segments(segment_ids):
  """Packed rows as cuDNN takes them: (lengths [B, M], offsets [B, M + 1]) of each row's
  documents (segments other than 0) in order of position, -1 past the last; M = T. Each
  document must be contiguous, as packing makes them."""
  b, t = segment_ids.shape
  pos = jnp.arange(t, dtype=jnp.int32)
  ids = jnp.clip(segment_ids, 0, t)

  def row(seg):
    length = jax.ops.segment_sum(jnp.ones(t, jnp.int32), seg, num_segments=t + 1)[1:]
    start = jax.ops.segment_min(pos, seg, num_segments=t + 1)[1:]
    order = jnp.argsort(jnp.where(length > 0, start, t + 1))   # present documents first
    length, start = length[order], start[order]
    present = length > 0
    return (jnp.where(present, length, -1),
            jnp.concatenate([jnp.where(present, start, -1), jnp.full(1, -1, jnp.int32)]))

  return jax.vmap(row)(ids)


def _cudnn(q, k, v, segment_ids):
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  lengths, offsets = cudnn_segments(segment_ids)
  out = cudnn.dot_product_attention(
      q, k.astype(q.dtype), v.astype(q.dtype), q_seqlen=lengths, kv_seqlen=lengths,
      q_offsets=offsets, kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
      mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
  return jnp.where(segment_ids[..., None, None] > 0, out, 0)   # padding: no segment in cuDNN


@functools.cache
def _splash_kernel(length: int, groups: int, interpret: bool, mesh):
  """A splash kernel (its mask info is costly to build), one per mesh it is traced under
  (one built under another mesh breaks the next lowering)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = min(512, length)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * groups)
  return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash(q, k, v, segment_ids, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  b, t, h, hd = q.shape
  hkv = k.shape[2]
  kernel = _splash_kernel(t, h // hkv, interpret, jax.sharding.get_abstract_mesh())
  # [B, Hkv, G, T, hd] queries against [B, Hkv, T, hd] keys: multi-query attention per K/V head
  qg = (q * hd ** -0.5).transpose(0, 2, 1, 3).reshape(b, hkv, h // hkv, t, hd)
  kg, vg = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))

  def row(q, k, v, seg):
    ids = splash.SegmentIds(seg, seg)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

  out = jax.vmap(row)(qg, kg, vg, segment_ids)
  return out.reshape(b, h, t, hd).transpose(0, 2, 1, 3)
