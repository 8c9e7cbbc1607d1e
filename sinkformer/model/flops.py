"""FLOPs per token, device peaks and MFU, with one documented formula.

FLOPs/token = 6 * N_matmul + 6 * L * s * d_attn
  N_matmul: parameters used in matmuls, LM head included, embedding gather excluded;
  the attention term is QK^T and AV (2 * 2 * s * d_attn per layer forward), x3 for
  forward + backward, halved because attention is causal.
MFU = tokens/s * FLOPs/token / (peak FLOP/s per device * devices). Peaks are the vendors'
dense bf16 numbers; on CPU (no published peak) we measure a large matmul instead.

Rematerialisation adds work that MFU does not count (`recompute_per_token`): `full` runs
every block's forward pass again in the backward pass (2 * N_blocks + 2 * L * s * d_attn
per token, attention causal-halved); `dots` keeps the projections' outputs and recomputes
only the attention scores and weighted sums (2 * L * s * d_attn) and elementwise work.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

PEAK_BF16 = {  # device_kind prefix -> dense bf16 FLOP/s
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def matmul_params(d) -> int:
  """N_matmul for model.Dims `d`."""
  attn = d.d_model * d.head_dim * (2 * d.num_heads + 2 * d.num_kv_heads)
  mlp = 3 * d.d_model * (d.mlp_backbone + d.num_sinks)
  return d.num_layers * (attn + mlp) + d.d_model * d.vocab_size


def flops_per_token(d, seq_len: int) -> float:
  return 6.0 * matmul_params(d) + 6.0 * d.num_layers * seq_len * d.num_heads * d.head_dim


def recompute_per_token(d, seq_len: int, remat: str) -> float:
  """FLOPs per token that rematerialisation policy `remat` adds to flops_per_token."""
  attention = 2.0 * d.num_layers * seq_len * d.num_heads * d.head_dim
  blocks = 2.0 * (matmul_params(d) - d.d_model * d.vocab_size)
  return {"none": 0.0, "dots": attention, "full": blocks + attention}[remat]


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of an n x n matmul on the default device (median of `reps`)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / float(np.median(times))


def device_peak(dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from)."""
  kind = jax.devices()[0].device_kind
  for prefix, peak in PEAK_BF16.items():
    if kind.startswith(prefix):
      return peak, f"{prefix} bf16 spec"
  return measured_matmul_peak(dtype), f"measured {dtype} matmul on {kind}"


def mfu(tokens_per_s: float, flops_token: float, peak: float, devices: int) -> float:
  return tokens_per_s * flops_token / (peak * devices)
