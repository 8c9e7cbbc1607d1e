"""`sinkformer plan`: what a config costs before hardware is rented.

Parameter count, FLOPs per token (flops.py's formula), and per-device memory of parameters
and optimizer state under the config's mesh, from the same sharding rules the trainer uses:
nothing is allocated. When this process has as many devices as the mesh (simulate them with
JAX_NUM_CPU_DEVICES=N), the train step is also compiled ahead of time on abstract inputs,
once per rematerialisation policy: the compile time, XLA's memory analysis per device (what
each policy saves) and the recomputation it costs (flops.recompute_per_token). With
`unrolled`, the unrolled layout is compiled too, for its compile time and XLA's FLOP count
(XLA counts a scanned loop's body once, so only the unrolled step checks the formula).
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
import optax

from sinkformer import config as config_lib, engine
from sinkformer.data import pipeline
from sinkformer.errors import UserError
from sinkformer.model import flops, transformer
from sinkformer.parallel import comms, mesh as mesh_lib
from sinkformer.train import trainer


def _mesh_size(cfg) -> int:
  sizes = [cfg.mesh[a] for a in config_lib.MESH_AXES]
  if -1 in sizes:
    return jax.device_count()
  return math.prod(sizes) * math.prod(config_lib.dcn_shape(cfg.mesh))


def per_device_bytes(abstract_tree, shardings, shape: dict) -> int:
  """Bytes one device holds: each dimension divided by the mesh axes it is sharded over."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings),
                            strict=True):
    dims = list(leaf.shape)
    for i, axes in enumerate(sharding.spec):
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        if axis is not None:
          dims[i] = math.ceil(dims[i] / shape[axis])
    total += math.prod(dims) * np.dtype(leaf.dtype).itemsize
  return total


def plan(cfg, unrolled: bool = False) -> dict:
  devices = _mesh_size(cfg)
  shape = dict(zip(config_lib.MESH_AXES, config_lib.validate(cfg, devices)))
  dims = transformer.Dims.from_config(cfg)
  _, abstract_params, axes = transformer.abstract(dims)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops_token = flops.flops_per_token(dims, cfg.data.seq_len)
  out = {"mesh": shape, "dcn": dict(zip(config_lib.MESH_AXES, config_lib.dcn_shape(cfg.mesh))),
         "remat": cfg.model.remat, "sync": cfg.train.sync,
         "parameters": transformer.count_params(abstract_params),
         "flops_per_token": flops_token, "flops_per_step": flops_token * tokens,
         "tokens_per_step": tokens}

  # Per-device state memory from the sharding rules alone: no devices needed.
  param_specs = jax.tree.map(lambda a: _Spec(mesh_lib.spec(a)), axes,
                             is_leaf=lambda x: isinstance(x, tuple))
  tx, _ = engine.make_optimizer(cfg, dims)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_specs = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_specs,
                                    transform_non_params=lambda _: _Spec(()),
                                    is_leaf=lambda x: isinstance(x, _Spec))
  out["params_bytes_per_device"] = per_device_bytes(abstract_params, param_specs, shape)
  out["optimizer_bytes_per_device"] = per_device_bytes(abstract_opt, opt_specs, shape)

  if jax.device_count() >= devices:
    out["compiled"] = {remat: _compile(cfg, devices, remat, scan=True)
                       for remat in transformer.REMAT}
    for remat, got in out["compiled"].items():
      got["recompute_flops_per_step"] = flops.recompute_per_token(dims, cfg.data.seq_len,
                                                                  remat) * tokens
    if unrolled:
      out["unrolled"] = _compile(cfg, devices, cfg.model.remat, scan=False)
  else:
    out["xla"] = (f"skipped: the mesh needs {devices} devices and this process has "
                  f"{jax.device_count()}; set JAX_NUM_CPU_DEVICES={devices} to compile on CPU")
  return out


# what the kernels are in a lowered module: custom calls the exporting process cannot check
KERNEL_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}   # jax.export's names -> the model's
TARGETS = {"cuda": ("gpu", "NVIDIA H100 80GB HBM3", 132), "tpu": ("tpu", "TPU v5p", 1)}


def lower(cfg, platform: str, devices: int | None = None) -> dict:
  """Lower the train step for `platform` (cuda or tpu) on an abstract mesh of the config's
  size (or of `devices`) of TARGETS' chips, with the config's attention backend resolved for
  that platform: shapes only, nothing allocated, no accelerator needed. Fails on any
  lowering error."""
  if platform not in PLATFORMS:
    raise UserError(f"--platform {platform!r}: one of {', '.join(PLATFORMS)}")
  setup = engine.build(cfg, devices or _mesh_size(cfg), platform=PLATFORMS[platform],
                       device=TARGETS[platform])
  state = engine.abstract_state(setup)
  batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), np.int32,
                                   sharding=setup.batch_sharding) for k in pipeline.FIELDS}
  checks = [jax.export.DisabledSafetyCheck.custom_call(c) for c in KERNEL_CALLS.values()]
  t0 = time.perf_counter()
  with mesh_lib.using(setup.mesh):
    exported = jax.export.export(trainer.jit_train_step(setup, batch), platforms=[platform],
                                 disabled_checks=checks)(state, batch)
  text = exported.mlir_module()
  return {"platform": platform, "devices": exported.nr_devices,
          "mesh": dict(setup.mesh.shape), "attention": setup.dims.attention,
          "remat": setup.dims.remat, "layers": setup.dims.num_layers,
          "seconds": time.perf_counter() - t0, "stablehlo_bytes": len(text),
          "kernel_calls": text.count(KERNEL_CALLS[platform])}


def _compile(cfg, devices: int, remat: str, scan: bool) -> dict:
  """AOT-compile the train step on abstract inputs: seconds, XLA FLOPs and memory per device."""
  cfg = cfg.copy_and_resolve_references()
  cfg.model.update(remat=remat, scan_layers=scan)
  setup = engine.build(cfg, jax.devices()[:devices])
  state = engine.abstract_state(setup)
  batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), np.int32,
                                   sharding=setup.batch_sharding) for k in pipeline.FIELDS}
  t0 = time.perf_counter()
  with mesh_lib.using(setup.mesh):
    compiled, hlo = comms.partitioned(trainer.jit_train_step(setup, batch).lower(state, batch))
  got = {"compile_s": time.perf_counter() - t0, "comms": comms.summary(comms.read(hlo))}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  got["xla_flops_per_step_per_device"] = float(cost.get("flops", float("nan")))
  mem = compiled.memory_analysis()
  if mem is not None:
    got["memory_per_device"] = {
        k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
        ("argument", "output", "temp", "generated_code") if hasattr(mem, f"{k}_size_in_bytes")}
  return got


class _Spec:
  """A stand-in sharding carrying only a PartitionSpec (no devices needed)."""

  def __init__(self, spec):
    self.spec = spec


def print_plan(result: dict):
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  dcn = {k: v for k, v in result["dcn"].items() if v > 1}
  print(f"mesh: {result['mesh']}" + (f", of which across slices/hosts {dcn}" if dcn else ""))
  print(f"parameters: {result['parameters']:,} ({result['parameters'] / 1e9:.3f} B)")
  print(f"FLOPs/token: {result['flops_per_token']:.4g} (6N + 6·L·s·d_attn); "
        f"per step: {result['flops_per_step']:.4g} for {result['tokens_per_step']:,} tokens")
  print(f"per device: parameters {gib(result['params_bytes_per_device'])}, optimizer "
        f"{gib(result['optimizer_bytes_per_device'])} (float32; gradients and activations extra)")
  if "xla" in result:
    print(f"compiled analysis: {result['xla']}")
    return
  print(f"compiled train step per rematerialisation policy (model.remat; this config: "
        f"{result['remat']}), per device:")
  for remat, got in result["compiled"].items():
    mem = ", ".join(f"{k} {gib(v)}" for k, v in got.get("memory_per_device", {}).items())
    extra = got["recompute_flops_per_step"] / result["flops_per_step"]
    print(f"  {remat:5s} compiled in {got['compile_s']:6.1f} s; {mem}; recomputes "
          f"+{100 * extra:.0f}% FLOPs")
  moved = result["compiled"][result["remat"]]["comms"]
  print(f"communication per step and device (train.sync {result['sync']}; the partitioner's "
        "collectives, loops counted):" + ("" if moved else " none"))
  for op, row in moved.items():
    dtypes = ", ".join(f"{d} {gib(b)}" for d, b in sorted(row["by_dtype"].items(),
                                                         key=lambda x: -x[1]))
    print(f"  {op:18s} {row['runs']:6,d} times, {gib(row['bytes'])} ({dtypes})")
  if "unrolled" in result:
    u, scanned = result["unrolled"], result["compiled"][result["remat"]]
    print(f"unrolled layout ({result['remat']}): compiled in {u['compile_s']:.1f} s, "
          f"{u['compile_s'] / scanned['compile_s']:.1f}x the scanned layers' "
          f"{scanned['compile_s']:.1f} s; XLA counts {u['xla_flops_per_step_per_device']:.4g} "
          "FLOPs per step per device")
