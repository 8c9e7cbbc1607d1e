"""Timing two variants fairly on a noisy machine: compiled steps, alternating rounds, and the
spread of per-round ratios (a single number would hide the noise)."""

from __future__ import annotations

import time

import jax
import numpy as np

from sinkformer import engine
from sinkformer.data import pipeline
from sinkformer.model import transformer
from sinkformer.train import trainer


def compiled(cfg, devices=None):
  """(setup, fresh state, first batch, compiled train step) for a config."""
  setup = engine.build(cfg, devices)
  state = engine.init_state(setup, cfg.seed)
  pipeline.prepare(cfg)
  batch = engine.put_batch(setup, pipeline.load(cfg).train.batch(0))
  return setup, state, batch, trainer.compile_train_step(setup, state, batch)


def timed_step(cfg, devices=None):
  setup, state, batch, step = compiled(cfg, devices)
  holder = {"state": state, "params": transformer.count_params(state["params"])}

  def run(steps: int = 1) -> float:
    """Seconds per step over `steps` back-to-back steps (one sync at the end)."""
    t0 = time.perf_counter()
    for _ in range(steps):
      holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps

  return setup, run, holder["params"]


def spread(ratios) -> dict:
  """Median and p10/p90 of per-round ratios (the noise a single number would hide)."""
  return {"ratio": float(np.median(ratios)), "ratio_p10": float(np.percentile(ratios, 10)),
          "ratio_p90": float(np.percentile(ratios, 90))}


def alternate(runs: dict, rounds: int, steps_per_round: int, warmup: int) -> dict:
  """Per-round seconds/step of each variant, alternating the order every round."""
  for run in runs.values():
    for _ in range(warmup):
      run()
  times = {k: [] for k in runs}
  for r in range(rounds):
    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
      times[name].append(runs[name](steps_per_round))
  return times
