"""Benchmarks of a trained run: generation with and without the KV cache, unlearn latency,
scoring probe facts. (The load test of a real server is load.py.)"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from sinkformer.bench import timing


def generation(run_dir: str, rounds: int = 10, batch: int = 8, max_new: int = 64) -> dict:
  """Tokens/s of greedy generation with the KV cache against recomputing the whole sequence
  every step, same prompts, alternating."""
  from sinkformer.serve import generate, serving
  server = serving.Server(run_dir)
  titles = [r["title"] for r in server.board.page("active", 0, batch)]
  prompts = [server.encode(t) for t in titles]
  sources = np.asarray([r["id"] for r in server.board.page("active", 0, batch)], np.int32)
  s = generate.Sampling(max_new=max_new)
  never = 10**9   # no early stop: both variants generate max_new tokens per row
  runs = {}
  for cache in (True, False):
    def run(steps: int = 1, cache=cache) -> float:
      t0 = time.perf_counter()
      for _ in range(steps):
        generate.sample(server.setup, server.params, prompts, sources, server.exclusion(), s,
                        use_cache=cache, eos=never)
      return (time.perf_counter() - t0) / steps
    runs["cache" if cache else "no_cache"] = run
  times = timing.alternate(runs, rounds, 1, 1)
  tok_s = {k: batch * max_new / float(np.median(v)) for k, v in times.items()}
  result = {"bench": "generate", "batch": batch, "max_new": max_new, **{f"{k}_tokens_per_s": v
            for k, v in tok_s.items()}, **timing.spread(np.array(times["no_cache"]) / np.array(times["cache"]))}
  print(f"generation, {batch} prompts x {max_new} new tokens: KV cache {tok_s['cache']:,.0f} "
        f"tok/s, without {tok_s['no_cache']:,.0f} tok/s: speed-up {result['ratio']:.1f}x")
  print(json.dumps(result))
  return result


def unlearning(run_dir: str, catalog: str | None = None, requests: int = 200,
               batch: int = 10_000) -> dict:
  """Latency from an unlearn request to its effect on the next generation (the exclusion
  mask the server passes in), one source at a time, then one batch of `batch` sources. With
  `catalog`, a scratch copy of the run uses that catalog (e.g. 6M sources)."""
  import shutil
  from sinkformer.run import switchboard
  from sinkformer.serve import serving
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(os.path.join(run_dir, "config.json"), tmp)
    os.symlink(os.path.abspath(os.path.join(run_dir, "checkpoints")), os.path.join(tmp, "checkpoints"))
    if catalog:
      switchboard.create(tmp, catalog)
    else:
      switchboard.copy(run_dir, tmp)
    server = serving.Server(tmp)
    total = len(server.board.catalog)
    rng = np.random.default_rng(0)
    ids = rng.choice(np.arange(1, total + 1), requests + batch, replace=False)
    times = []
    for i in ids[:requests]:
      t0 = time.perf_counter()
      server.board.unlearn([f"id:{i}"], "bench")
      server.refresh()
      server.exclusion()
      times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    server.board.unlearn([f"id:{i}" for i in ids[requests:]], "bench")
    server.refresh()
    server.exclusion()
    batch_s = time.perf_counter() - t0
    server.board.close()
  result = {"bench": "unlearn", "sources": total, "p50_s": float(np.percentile(times, 50)),
            "p99_s": float(np.percentile(times, 99)), "batch": batch, "batch_s": batch_s}
  print(f"unlearn one source of {total:,} -> excluded on the next generation: p50 "
        f"{1e3 * result['p50_s']:.2f} ms, p99 {1e3 * result['p99_s']:.2f} ms; a batch of "
        f"{batch:,}: {batch_s:.2f} s")
  print(json.dumps(result))
  return result


def probes(run_dir: str, facts_path: str, count: int = 1000) -> dict:
  """Seconds to score `count` probe facts (answer + distractors) under one condition
  (sink-off/exclude), after one warm-up batch has compiled."""
  from sinkformer.eval import context
  facts = context.load_facts(facts_path)[:count]
  scorer = context.Scorer(run_dir, [facts[0]["source"]])
  def timed(items) -> float:
    t0 = time.perf_counter()
    context.fact_truth_ratios(scorer, "sink-off/exclude", items)
    return time.perf_counter() - t0
  timed(facts[:32])
  seconds = timed(facts)
  result = {"bench": "probes", "probes": len(facts),
            "candidates": len(facts) * (1 + len(facts[0]["distractors"])), "seconds": seconds}
  print(f"{len(facts):,} probes ({result['candidates']:,} scored answers), one condition: "
        f"{seconds:.1f} s")
  print(json.dumps(result))
  return result


def routing(run_dir: str) -> dict:
  """Top-1 accuracy of routing each surviving source's title back to it, per router text."""
  from sinkformer import config as config_lib
  from sinkformer.serve import serving
  result = {"bench": "route"}
  for text in config_lib.ROUTER_TEXTS:
    accuracy, n = serving.routing_accuracy(serving.Server(run_dir, router_text=text),
                                           limit=10**9)
    print(f"router on {text}: top-1 accuracy {accuracy:.3f} routing each surviving source's "
          f"title back to it ({n:,} sources)")
    result[text] = {"top1": accuracy, "sources": n}
  print(json.dumps(result))
  return result
