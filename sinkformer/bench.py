"""Benchmarks: they print figures, they never assert. Run them on a quiet machine.

`checkpoint`: how long an async save blocks the loop, how long until it is on disk, its size,
and the step time with and without a save in it (alternating, same process).

`devices`: the same train step on one device and on all devices (e.g. 8 simulated CPUs).

`stream`: tokens/s of the data pipeline alone per reader thread count, against what the
train step consumes (or on prepared data given by path).

`scale`: prepare a generated corpus of millions of one-document sources; peak memory (worker
processes included), catalog lookup latency, the first batch of a resumed late epoch, the
stream per thread count.

`sinks`: the NULL's train step against the dense control's (same shapes, same parameter
count) in one process, alternating, so machine noise hits both alike; prints the median
per-round ratio and a JSON line.

`mfu`: compile seconds, first step (autotuning included), step time, tokens/s and MFU of the
NULL and the dense control on synthetic packed rows of the config's shape (no corpus
needed: the 1B model on a bare accelerator).

`memory`: per rematerialisation policy, the step's memory per device from XLA's analysis at
two micro-batch sizes, the cost of one more row, and the largest micro-batch this device
holds.

`attention`: each attention backend this platform runs, forward and backward on packed rows
of the config's heads (16 x 1024 tokens of 32 documents each, by default).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np

from sinkformer import checkpoint, engine
from sinkformer.data import pipeline
from sinkformer.model import flops, transformer
from sinkformer.train import trainer


def _compiled(cfg, devices=None):
  """(setup, fresh state, first batch, compiled train step) for a config."""
  setup = engine.build(cfg, devices)
  state = engine.init_state(setup, cfg.seed)
  pipeline.prepare(cfg)
  batch = engine.put_batch(setup, pipeline.load(cfg).train.batch(0))
  return setup, state, batch, trainer.compile_train_step(setup, state, batch)


def _timed_step(cfg, devices=None):
  setup, state, batch, step = _compiled(cfg, devices)
  holder = {"state": state, "params": transformer.count_params(state["params"])}

  def run(steps: int = 1) -> float:
    """Seconds per step over `steps` back-to-back steps (one sync at the end)."""
    t0 = time.perf_counter()
    for _ in range(steps):
      holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps

  return setup, run, holder["params"]


def _spread(ratios) -> dict:
  """Median and p10/p90 of per-round ratios (the noise a single number would hide)."""
  return {"ratio": float(np.median(ratios)), "ratio_p10": float(np.percentile(ratios, 10)),
          "ratio_p90": float(np.percentile(ratios, 90))}


def _alternate(runs: dict, rounds: int, steps_per_round: int, warmup: int) -> dict:
  """Per-round seconds/step of each variant, alternating the order every round."""
  for run in runs.values():
    for _ in range(warmup):
      run()
  times = {k: [] for k in runs}
  for r in range(rounds):
    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
      times[name].append(runs[name](steps_per_round))
  return times


def devices(cfg, rounds: int = 20, steps_per_round: int = 3, warmup: int = 2) -> dict:
  """The same train step on one device and on every device (mesh from the config)."""
  everything = jax.devices()
  c1 = cfg.copy_and_resolve_references()
  c1.mesh.update(data=1, fsdp=1, tensor=1)
  runs = {"1": _timed_step(c1, everything[:1])[1],
          str(len(everything)): _timed_step(cfg, everything)[1]}
  times = _alternate(runs, rounds, steps_per_round, warmup)
  one, many = (float(np.median(times[k])) for k in runs)
  ratios = np.array(times[str(len(everything))]) / np.array(times["1"])
  result = {"bench": "devices", "devices": len(everything), "mesh": dict(cfg.mesh),
            "step_s_1": one, f"step_s_{len(everything)}": many, **_spread(ratios),
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
    variants[kind] = _timed_step(c)
  setup = variants["null"][0]
  times = _alternate({k: v[1] for k, v in variants.items()}, rounds, steps_per_round, warmup)
  ratios = np.array(times["null"]) / np.array(times["dense"])
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops_token = flops.flops_per_token(setup.dims, cfg.data.seq_len)
  peak, peak_src = flops.device_peak(cfg.model.dtype)
  result = {"bench": "sinks", **_spread(ratios), "rounds": rounds,
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
  _, state, batch, step = _compiled(cfg)
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


def stream_rates(batches: pipeline.Batches, workers, batches_per_count: int = 200) -> dict:
  """Per reader thread count: document tokens/s (padding not counted) of the Grain pipeline
  (`iterate`) in steady state (from its first batch to its last: the pipeline's start is
  reported apart, as the seconds to its first batch). Each count reads steps no other count
  has read."""
  out, step = {}, 1
  for w in workers:
    t0 = time.perf_counter()
    it = pipeline.iterate(batches, step, step + batches_per_count + 1, threads=w)
    next(it)
    first, tokens = time.perf_counter() - t0, 0
    for _ in range(batches_per_count):
      tokens += int((next(it)["segment_ids"] > 0).sum())
    out[w] = {"tokens_per_s": tokens / (time.perf_counter() - t0 - first),
              "first_batch_s": first}
    step += batches_per_count + 1
  return out


def stream(cfg=None, rounds: int = 30, steps_per_round: int = 4, data: str | None = None,
           workers=(0, 1, 2, 4), rows: int = 64, seq_len: int = 128, max_docs: int = 32) -> dict:
  """Tokens/s of the data pipeline per reader thread count (stream_rates): on the config's
  data, against what its train step consumes (median of `rounds`), or on prepared data
  given by path (`rows` x `seq_len` batches, no model)."""
  if data is not None:
    docs = pipeline.open_prepared(data)
    batches = pipeline.Batches([pipeline.DocStream(docs, None, seq_len, max_docs, seed=0)], [1],
                               rows)
    summary = f"{docs.origin}: {len(docs.lengths):,} documents, batches of {rows}x{seq_len}"
  else:
    pipeline.prepare(cfg)
    d = pipeline.load(cfg)
    batches, summary = d.train, d.summary
  print(f"data: {summary}")
  rates = stream_rates(batches, list(workers))
  result = {"bench": "stream", "data": summary, "per_thread_count": rates}
  for w, rate in rates.items():
    print(f"  {w} reader thread{'s' if w != 1 else ''}: {rate['tokens_per_s']:,.0f} tokens/s "
          f"(first batch after {rate['first_batch_s']:.2f}s)")
  if cfg is not None:
    _, run, _ = _timed_step(cfg)
    run()
    train = cfg.train.batch_size * cfg.data.seq_len / float(np.median(
        [run(steps_per_round) for _ in range(rounds)]))
    result["train_tokens_per_s"] = train
    best = max(r["tokens_per_s"] for r in rates.values())
    print(f"  the train step consumes {train:,.0f} tokens/s: the best stream is "
          f"{best / train:.1f}x that")
  print(json.dumps(result))
  return result


class _TreeRss:
  """Peak resident memory of this process and its children (sampled every 0.2 s), so
  worker processes count."""

  def __init__(self):
    import psutil
    import threading
    self.peak, self._stop = 0, threading.Event()
    me = psutil.Process()

    def sample():
      while not self._stop.wait(0.2):
        total = 0
        for p in [me, *me.children(recursive=True)]:
          try:
            total += p.memory_info().rss
          except psutil.Error:   # exited between listing and reading
            pass
        self.peak = max(self.peak, total)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return self.peak


def scale(num_docs: int, directory: str, lookups: int = 20000, group_size: int = 1,
          workers=(0, 1, 2, 4)) -> dict:
  """Prepare a generated corpus of `num_docs` tiny documents (one source each), then time
  catalog lookups, the first batch of a late epoch as a resumed run reads it, and the
  stream per reader thread count. Peak RSS covers the prepare's worker processes too."""
  from sinkformer.data import catalog as catalog_lib, prepare
  os.makedirs(directory, exist_ok=True)
  corpus, out = os.path.join(directory, "tiny.jsonl"), os.path.join(directory, "prepared")
  rng = np.random.default_rng(0)
  jobs = ["farmer", "poet", "sailor", "judge", "weaver", "miner", "clerk", "baker"]
  places = ["Arlen", "Bray", "Corvo", "Dunmere", "Elst", "Fennick", "Gorse", "Holt"]
  t0 = time.perf_counter()
  if not os.path.exists(corpus):
    with open(corpus + ".tmp", "w") as f:
      for i in range(num_docs):
        f.write(json.dumps({"key": f"p{i}", "title": f"Person {i}",
                            "text": f"Person {i} was a {jobs[i % 8]} born in "
                                    f"{places[rng.integers(8)]} in {1700 + i % 300}."}) + "\n")
    os.replace(corpus + ".tmp", corpus)
  generate_s = time.perf_counter() - t0
  if os.path.exists(out):
    import shutil
    shutil.rmtree(out)
  rss = _TreeRss()
  t0 = time.perf_counter()
  m = prepare.prepare(corpus, out, vocab_size=1024, group_size=group_size, log=print)
  prepare_s = time.perf_counter() - t0
  peak_rss = rss.stop()

  cat = catalog_lib.Catalog(os.path.join(out, "catalog.sqlite"))
  ids = rng.integers(1, num_docs + 1, lookups)
  kinds = {"id": [f"id:{i}" for i in ids], "key": [f"p{i - 1}" for i in ids],
           "title": [f"  PERSON {i - 1} " for i in ids]}
  latency = {}
  for kind, refs in kinds.items():
    times = []
    for ref in refs:
      t = time.perf_counter()
      cat.get(ref)
      times.append(time.perf_counter() - t)
    latency[kind] = (float(np.percentile(times, 50)), float(np.percentile(times, 99)))
  cat.close()

  rows, seq_len, epoch = 16, 128, 3
  stream = pipeline.DocStream(pipeline.open_prepared(out), None, seq_len, 16, seed=0)
  per_epoch = [stream.epoch_rows(0)] * epoch   # what a checkpoint records
  t0 = time.perf_counter()   # a run resumed in epoch 3: open, plan epoch 3 only, one batch
  resumed = pipeline.Batches([pipeline.DocStream(pipeline.open_prepared(out), None, seq_len,
                                                 16, seed=0)], [1], rows)
  resumed.remember([per_epoch])
  late_step = sum(per_epoch[:epoch]) // rows + 1
  next(pipeline.iterate(resumed, late_step, late_step + 1, threads=1))
  first_batch_s = time.perf_counter() - t0
  rates = {r: stream_rates(pipeline.Batches([stream], [1], r), list(workers))
           for r in (16, 64)}
  result = {"bench": "scale", "documents": m["documents"], "tokens": m["tokens"],
            "sources": m["sources"], "shards": len(m["shards"]), "generate_s": generate_s,
            "prepare_s": prepare_s, "peak_rss_bytes": peak_rss,
            "late_epoch_first_batch_s": first_batch_s, "group_size": group_size,
            "stream_tokens_per_s": {f"{r}x{seq_len}/{w}": v["tokens_per_s"]
                                    for r, by in rates.items() for w, v in by.items()},
            **{f"lookup_{k}_p50_s": v[0] for k, v in latency.items()},
            **{f"lookup_{k}_p99_s": v[1] for k, v in latency.items()}}
  print(f"{m['documents']:,} documents, {m['tokens']:,} tokens, {m['sources']:,} sources, "
        f"{len(m['shards'])} shards: prepare {prepare_s:.0f}s, peak RSS (with workers) "
        f"{peak_rss / 2**30:.2f} GiB")
  for k, (p50, p99) in latency.items():
    print(f"  catalog lookup by {k}: p50 {1e6 * p50:.0f} us, p99 {1e6 * p99:.0f} us")
  print(f"  resumed in epoch {epoch}: open + plan + first batch {first_batch_s:.2f}s")
  for r, by in rates.items():
    print(f"  stream, batches of {r}x{seq_len}: " + ", ".join(
        f"{w} thread{'s' if w != 1 else ''} {v['tokens_per_s']:,.0f} tokens/s"
        for w, v in by.items()))
  print(json.dumps(result))
  return result


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
  times = _alternate(runs, rounds, 1, 1)
  tok_s = {k: batch * max_new / float(np.median(v)) for k, v in times.items()}
  result = {"bench": "generate", "batch": batch, "max_new": max_new, **{f"{k}_tokens_per_s": v
            for k, v in tok_s.items()}, **_spread(np.array(times["no_cache"]) / np.array(times["cache"]))}
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
  times = _alternate(runs, rounds, steps_per_round, warmup=1)
  for kind in runs:
    step_s = float(np.median(times[kind]))
    result.update({f"{kind}_step_s": step_s, f"{kind}_tokens_per_s": tokens / step_s,
                   f"{kind}_mfu": flops.mfu(tokens / step_s, flops_token, peak, devices)})
  result.update(_spread(np.array(times["null"]) / np.array(times["dense"])))
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
  times = _alternate(runs, rounds, 3, warmup=1)
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


BENCHES = {"sinks": sinks, "checkpoint": checkpoints, "stream": stream, "devices": devices,
           "mfu": mfu}
