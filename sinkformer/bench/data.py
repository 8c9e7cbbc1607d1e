"""Benchmarks of the data: the Grain stream per reader thread count, and preparing millions
of sources (memory, catalog lookups, the first batch of a late epoch)."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from sinkformer.bench import timing
from sinkformer.data import pipeline


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
    _, run, _ = timing.timed_step(cfg)
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
