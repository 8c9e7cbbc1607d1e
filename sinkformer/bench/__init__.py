"""Benchmarks: they print figures (medians, and ratios measured side by side in one process)
and never assert. Run them on a quiet machine; `sinkformer bench NAME` runs one.

The train step (steps.py): `sinks` NULL vs the equal-size dense control; `devices` one
device vs all; `mfu` compile, first step, step time, tokens/s and MFU on synthetic rows;
`memory` per remat policy, and the largest micro-batch; `attention` every backend this
platform runs; `checkpoint` what an async save costs. The data (data.py): `stream` the
Grain pipeline per reader thread count; `scale` preparing millions of sources. A trained
run (serving.py): `generate` KV cache vs none; `route` routing accuracy; `probes` scoring
probe facts; `unlearn` request-to-effect latency. A real server (load.py): `serve`, with
HTTP and CLI unlearns and clients that hang up.
"""

from __future__ import annotations

import importlib

# name -> (module of this package, function): the one list of benchmarks
REGISTRY = {
    "sinks": ("steps", "sinks"), "devices": ("steps", "devices"), "mfu": ("steps", "mfu"),
    "memory": ("steps", "memory"), "attention": ("steps", "attention"),
    "checkpoint": ("steps", "checkpoints"), "stream": ("data", "stream"),
    "scale": ("data", "scale"), "generate": ("serving", "generation"),
    "route": ("serving", "routing"), "probes": ("serving", "probes"),
    "unlearn": ("serving", "unlearning"), "serve": ("load", "run"),
}


def get(name: str):
  """The function of benchmark `name` (its module imported only now: jax is slow to load)."""
  module, function = REGISTRY[name]
  return getattr(importlib.import_module(f"sinkformer.bench.{module}"), function)
