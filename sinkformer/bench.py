"""Benchmarks: they print figures, they never assert. Run them on a quiet machine.

`sinks`: the NULL's train step against the dense control's (same shapes, same parameter
count) in one process, alternating, so machine noise hits both alike; prints the median
per-round ratio and a JSON line.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from sinkformer import flops, model, packing, train


def _timed_step(cfg):
  setup = train.build(cfg)
  state = train.init_state(setup, cfg.seed)
  rows, _ = train.builtin_rows(cfg)
  batch = train.put_batch(setup, packing.Stream(rows, cfg.train.batch_size, cfg.seed).batch(0))
  step = train.compile_train_step(setup, state, batch)
  holder = {"state": state, "params": model.count_params(state["params"])}

  def run(steps: int = 1) -> float:
    """Seconds per step over `steps` back-to-back steps (one sync at the end)."""
    t0 = time.perf_counter()
    for _ in range(steps):
      holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps

  return setup, run, holder["params"]


def sinks(cfg, rounds: int = 30, steps_per_round: int = 3, warmup: int = 3) -> dict:
  variants = {}
  for kind in ("null", "dense"):
    c = cfg.copy_and_resolve_references()
    c.model.kind = kind
    variants[kind] = _timed_step(c)
  setup = variants["null"][0]
  for _, run, _ in variants.values():
    for _ in range(warmup):
      run()
  times = {k: [] for k in variants}
  for r in range(rounds):
    for kind in (("null", "dense") if r % 2 == 0 else ("dense", "null")):
      times[kind].append(variants[kind][1](steps_per_round))
  ratios = np.array(times["null"]) / np.array(times["dense"])
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops_token = flops.flops_per_token(setup.dims, cfg.data.seq_len)
  peak, peak_src = flops.device_peak(cfg.model.dtype)
  result = {"bench": "sinks", "ratio": float(np.median(ratios)),
            "ratio_p10": float(np.percentile(ratios, 10)),
            "ratio_p90": float(np.percentile(ratios, 90)), "rounds": rounds,
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


BENCHES = {"sinks": sinks}
