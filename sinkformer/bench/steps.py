"""Benchmarks of the train step: NULL vs dense, one device vs all, MFU, memory per remat
policy, attention backends, and what an async checkpoint save costs."""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np

from sinkformer import checkpoint, engine
from sinkformer.bench import timing
from sinkformer.data import pipeline
from sinkformer.model import flops, transformer
from sinkformer.train import trainer


def devices(cfg, rounds: int = 20, steps_per_round: int = 3, warmup: int = 2) -> dict:
  """The same train step on one device and on every device (mesh from the config)."""
  everything = jax.devices()
  c1 = cfg.copy_and_resolve_references()
  c1.mesh.update(data=1, fsdp=1, tensor=1)
  runs = {"1": timing.timed_step(c1, everything[:1])[1],
          str(len(everything)): timing.timed_step(cfg, everything)[1]}
  times = timing.alternate(runs, rounds, steps_per_round, warmup)
  one, many = (float(np.median(times[k])) for k in runs)
  ratios = np.array(times[str(len(everything))]) / np.array(times["1"])
  result = {"bench": "devices", "devices": len(everything), "mesh": dict(cfg.mesh),
            "step_s_1": one, f"step_s_{len(everything)}": many, **timing.spread(ratios),
            "rounds": rounds}
  print(f"train step on 1 device {1e3 * one:.1f} ms, on {len(everything)} devices "
        f"{1e3 * many:.1f} ms: ratio {result['ratio']:.2f} (p10 {result['ratio_p10']:.2f}, "
        f"p90 {result['ratio_p90']:.2f})")
  print(json.dumps(result))
  return result


def sinks(cfg, rounds: int = 30, steps_per_round: int = 3, warmup: int = 3) -> dict:
  variants = {}
  for kind in ("null", "dense"):
    c = cfg.copy_and_resolve_references()
    c.model.kind = kind
    variants[kind] = timing.timed_step(c)
  setup = variants["null"][0]
  times = timing.alternate({k: v[1] for k, v in variants.items()}, rounds, steps_per_round, warmup)
  ratios = np.array(times["null"]) / np.array(times["dense"])
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops_token = flops.flops_per_token(setup.dims, cfg.data.seq_len)
  peak, peak_src = flops.device_peak(cfg.model.dtype)
  result = {"bench": "sinks", **timing.spread(ratios), "rounds": rounds,
            "steps_per_round": steps_per_round,
            "params": {k: v[2] for k, v in variants.items()},
            "peak_flops": peak, "peak_source": peak_src, "devices": setup.mesh.size}
  for kind in variants:
    step_s = float(np.median(times[kind]))
    result[f"{kind}_step_s"] = step_s
    result[f"{kind}_tokens_per_s"] = tokens / step_s
    result[f"{kind}_mfu"] = flops.mfu(tokens / step_s, flops_token, peak, setup.mesh.size)
  print(f"train step, median of {rounds} alternating rounds of {steps_per_round} steps "
        f"({tokens} tokens/step, "
        f"peak {peak / 1e9:.0f} GFLOP/s: {peak_src})")
  for kind in variants:
    print(f"  {kind:5s}  {1e3 * result[f'{kind}_step_s']:8.2f} ms  "
          f"{result[f'{kind}_tokens_per_s']:10.0f} tok/s  MFU {100 * result[f'{kind}_mfu']:.1f}%")
  print(f"  NULL / dense step time: {result['ratio']:.3f} "
        f"(p10 {result['ratio_p10']:.3f}, p90 {result['ratio_p90']:.3f})")
  print(json.dumps(result))
  return result


def checkpoints(cfg, rounds: int = 10) -> dict:
  _, state, batch, step = timing.compiled(cfg)
  meta = {"config": json.loads(cfg.to_json())}
  with tempfile.TemporaryDirectory() as tmp:
    ckpts = checkpoint.Checkpoints(tmp, every=1, keep=2)
    blocking, total, plain, during = [], [], [], []
    for r in range(1, rounds + 1):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      plain.append(time.perf_counter() - t0)
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      ckpts.save(2 * r, state, meta, force=True)
      blocking.append(time.perf_counter() - t0)
      t1 = time.perf_counter()
      state, m = step(state, batch)          # runs while the save is written
      jax.block_until_ready(m)
      during.append(time.perf_counter() - t1)
      ckpts.wait()
      total.append(time.perf_counter() - t0)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
               os.walk(os.path.join(tmp, str(2 * rounds))) for f in fs)
    ckpts.close()
  med = lambda xs: float(np.median(xs))
  result = {"bench": "checkpoint", "bytes": size, "params": transformer.count_params(state["params"]),
            "step_s": med(plain), "step_during_save_s": med(during),
            "save_blocking_s": med(blocking), "save_total_s": med(total), "rounds": rounds}
  print(f"checkpoint of {result['params']:,} params: {size / 2**20:.1f} MiB on disk")
  print(f"  save blocks the loop {1e3 * result['save_blocking_s']:.1f} ms; on disk after "
        f"{1e3 * result['save_total_s']:.1f} ms; step {1e3 * result['step_s']:.1f} ms, "
        f"{1e3 * result['step_during_save_s']:.1f} ms while a save is written")
  print(json.dumps(result))
  return result


def synthetic_batch(cfg, seed: int = 0) -> dict[str, np.ndarray]:
  """A global batch of the config's shape: random tokens packed as documents of random
  length (mean a third of a row, at most data.max_docs_per_row per row), each its own
  random source, the rest of a row padding."""
  rng = np.random.default_rng(seed)
  d = cfg.data
  rows = []
  for _ in range(cfg.train.batch_size):
    row, room = [], d.seq_len - int(rng.integers(0, d.seq_len // 8))
    while room > 1 and len(row) < d.max_docs_per_row:
      n = int(min(room, max(2, rng.geometric(3 / d.seq_len))))
      row.append((rng.integers(4, cfg.model.vocab_size, n), int(rng.integers(1, 2**31 - 1))))
      room -= n
    rows.append(row)
  return pipeline.assemble(rows, d.seq_len)


def _kinds(cfg) -> dict:
  """The config as the NULL and as its dense control."""
  out = {}
  for kind in ("null", "dense"):
    c = cfg.copy_and_resolve_references()
    c.model.kind = kind
    out[kind] = c
  return out


def mfu(cfg, rounds: int = 10, steps_per_round: int = 3) -> dict:
  tokens = cfg.train.batch_size * cfg.data.seq_len
  peak, peak_src = flops.device_peak(cfg.model.dtype)
  result = {"bench": "mfu", "layers": cfg.model.num_layers, "rows": cfg.train.batch_size,
            "grad_accum": cfg.train.grad_accum, "seq_len": cfg.data.seq_len,
            "remat": cfg.model.remat, "peak_flops": peak, "peak_source": peak_src}
  runs = {}
  for kind, c in _kinds(cfg).items():
    setup = engine.build(c)
    result["attention"] = setup.dims.attention
    state = engine.init_state(setup, c.seed)
    batch = engine.put_batch(setup, synthetic_batch(c))
    t0 = time.perf_counter()
    step = trainer.compile_train_step(setup, state, batch)
    result[f"{kind}_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    result[f"{kind}_first_step_s"] = time.perf_counter() - t0
    holder = {"state": state}

    def run(steps: int = 1, step=step, holder=holder, batch=batch) -> float:
      t0 = time.perf_counter()
      for _ in range(steps):
        holder["state"], metrics = step(holder["state"], batch)
      jax.block_until_ready(metrics)
      return (time.perf_counter() - t0) / steps
    runs[kind] = run
    flops_token = flops.flops_per_token(setup.dims, c.data.seq_len)
    devices = setup.mesh.size
  times = timing.alternate(runs, rounds, steps_per_round, warmup=1)
  for kind in runs:
    step_s = float(np.median(times[kind]))
    result.update({f"{kind}_step_s": step_s, f"{kind}_tokens_per_s": tokens / step_s,
                   f"{kind}_mfu": flops.mfu(tokens / step_s, flops_token, peak, devices)})
  result.update(timing.spread(np.array(times["null"]) / np.array(times["dense"])))
  print(f"{cfg.model.num_layers} layers, {cfg.train.batch_size} rows x {cfg.data.seq_len} "
        f"tokens per step (grad_accum {cfg.train.grad_accum}), remat {cfg.model.remat}, "
        f"attention {result['attention']}; peak {peak / 1e12:.3g} TFLOP/s ({peak_src})")
  for kind in runs:
    print(f"  {kind:5s} compile {result[f'{kind}_compile_s']:6.1f} s, first step "
          f"{result[f'{kind}_first_step_s']:6.1f} s, step {1e3 * result[f'{kind}_step_s']:8.1f} "
          f"ms, {result[f'{kind}_tokens_per_s']:10,.0f} tok/s, MFU {100 * result[f'{kind}_mfu']:.1f}%")
  print(f"  NULL / dense step time: {result['ratio']:.3f} (p10 {result['ratio_p10']:.3f}, "
        f"p90 {result['ratio_p90']:.3f})")
  print(json.dumps(result))
  return result


def memory(cfg, rows=(1, 2)) -> dict:
  """Per remat policy: XLA's bytes per device for the train step at micro-batches of `rows`
  rows per device, the fixed part and the cost of a row (a linear fit; with one size, the
  temporaries are taken as all per-row), and the largest micro-batch that fits this
  device's memory (when the runtime reports it)."""
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  result = {"bench": "memory", "layers": cfg.model.num_layers, "device_bytes": limit,
            "policies": {}}
  for remat in transformer.REMAT:
    used = []
    for r in rows:
      c = cfg.copy_and_resolve_references()
      c.model.remat = remat
      replicas = engine.build(c).mesh.shape
      c.train.update(batch_size=r * replicas["data"] * replicas["fsdp"], grad_accum=1)
      setup = engine.build(c)
      batch = {k: jax.ShapeDtypeStruct((c.train.batch_size, c.data.seq_len), np.int32,
                                       sharding=setup.batch_sharding) for k in pipeline.FIELDS}
      mem = trainer.compile_train_step(setup, engine.abstract_state(setup), batch).memory_analysis()
      used.append({k: getattr(mem, f"{k}_size_in_bytes") for k in ("argument", "output", "temp")})
    if len(rows) > 1:
      total = [sum(u.values()) for u in used]
      per_row = (total[-1] - total[0]) / (rows[-1] - rows[0])
      fixed = total[0] - per_row * rows[0]
    else:
      per_row, fixed = used[0]["temp"] / rows[0], used[0]["argument"] + used[0]["output"]
    fits = int((limit - fixed) // per_row) if limit and per_row > 0 else None
    result["policies"][remat] = {"fixed_bytes": fixed, "row_bytes": per_row,
                                 "largest_rows_per_device": fits}
  print(f"{cfg.model.num_layers} layers, {cfg.data.seq_len} tokens per row; device memory "
        + (f"{limit / 2**30:.1f} GiB" if limit else "not reported by this runtime"))
  for remat, got in result["policies"].items():
    print(f"  remat {remat:5s}: fixed {got['fixed_bytes'] / 2**30:6.2f} GiB + "
          f"{got['row_bytes'] / 2**30:6.2f} GiB per row per device"
          + (f"; largest micro-batch {got['largest_rows_per_device']} rows per device"
             if got["largest_rows_per_device"] is not None else ""))
  print(json.dumps(result))
  return result


def attention(cfg, rows: int = 16, length: int = 1024, docs: int = 32, rounds: int = 10) -> dict:
  """Milliseconds of one forward and backward (all three gradients) of each backend that runs
  here, on `rows` rows of `length` tokens packed with `docs` equal documents, in the
  config's heads and compute dtype; alternating backends every round."""
  from sinkformer.errors import ConfigError
  from sinkformer.model import attention as attention_lib, flash
  m = cfg.model
  dtype = transformer.DTYPES[m.dtype]
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (rows, length, m.num_heads, m.head_dim), dtype)
  k, v = (jax.random.normal(x, (rows, length, m.num_kv_heads, m.head_dim), dtype)
          for x in keys[1:3])
  weights = jax.random.normal(keys[3], q.shape, dtype)
  seg = jax.numpy.asarray(np.repeat(np.arange(1, docs + 1), -(-length // docs))[:length][None]
                          .repeat(rows, 0), np.int32)
  platform = jax.default_backend()
  result = {"bench": "attention", "rows": rows, "length": length, "docs": docs,
            "heads": [m.num_heads, m.num_kv_heads, m.head_dim], "dtype": m.dtype,
            "platform": platform, "backends": {}}
  runs = {}
  for backend in attention_lib.BACKENDS:
    try:
      attention_lib.resolve(backend, platform)
    except ConfigError as e:
      result["backends"][backend] = {"skipped": str(e).split(": ", 1)[-1]}
      continue
    loss = lambda q, k, v, b=backend: (attention_lib.packed(q, k, v, seg, b).astype(jax.numpy.float32)
                                       * weights).sum()
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    jax.block_until_ready(step(q, k, v))
    result["backends"][backend] = {"compile_s": time.perf_counter() - t0}

    def run(steps: int = 1, step=step) -> float:
      t0 = time.perf_counter()
      for _ in range(steps):
        out = step(q, k, v)
      jax.block_until_ready(out)
      return (time.perf_counter() - t0) / steps
    runs[backend] = run
  times = timing.alternate(runs, rounds, 3, warmup=1)
  for backend in runs:
    result["backends"][backend]["fwd_bwd_ms"] = 1e3 * float(np.median(times[backend]))
  blocks = flash.block_sizes(m.head_dim, length)
  result["pallas_blocks_visited"] = flash.visited(seg, *blocks.fwd)
  print(f"attention, {rows} x {length} tokens of {docs} documents a row, heads "
        f"{m.num_heads}/{m.num_kv_heads} x {m.head_dim}, {m.dtype} on {platform}; the flash "
        f"kernel visits {100 * result['pallas_blocks_visited']:.1f}% of the causal blocks")
  for backend, got in result["backends"].items():
    print(f"  {backend:7s} " + (f"skipped: {got['skipped']}" if "skipped" in got else
                                f"forward+backward {got['fwd_bwd_ms']:8.2f} ms (compile "
                                f"{got['compile_s']:.1f} s)"))
  print(json.dumps(result))
  return result
