"""`sinkformer bench ...`: benchmarks that print figures (never assert)."""

from __future__ import annotations

from absl import flags

from sinkformer.cli.common import Command, run_flag
from sinkformer.config import define_config_flag


def _bench_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_integer("rounds", 30, "timed rounds (each times every variant once)",
                       flag_values=fv)


def _bench(fv, name):
  from sinkformer import bench
  bench.get(name)(fv.config, rounds=fv.rounds)


def _attention_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_integer("rows", 16, "packed rows", flag_values=fv)
  flags.DEFINE_integer("length", 1024, "tokens per row", flag_values=fv)
  flags.DEFINE_integer("docs", 32, "documents per row (equal lengths)", flag_values=fv)
  flags.DEFINE_integer("rounds", 10, "timed rounds", flag_values=fv)


def _attention(fv):
  from sinkformer import bench
  bench.get("attention")(fv.config, fv.rows, fv.length, fv.docs, fv.rounds)


def _memory_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_list("rows", ["1", "2"], "micro-batch rows per device to compile at (two or "
                    "more: the fit is linear)", flag_values=fv)


def _memory(fv):
  from sinkformer import bench
  bench.get("memory")(fv.config, tuple(int(r) for r in fv.rows))


def _serve_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_integer("clients", 64, "concurrent clients", flag_values=fv)
  flags.DEFINE_float("duration_s", 30.0, "how long the clients send requests", flag_values=fv)
  flags.DEFINE_integer("http_unlearns", 3, "sources unlearned over HTTP meanwhile",
                       flag_values=fv)
  flags.DEFINE_integer("cli_unlearns", 3, "sources unlearned by 'sinkformer unlearn' "
                       "processes meanwhile", flag_values=fv)
  flags.DEFINE_integer("max_tokens", 16, "new tokens per completion", flag_values=fv)
  flags.DEFINE_integer("max_batch", 32, "the server's --max_batch", flag_values=fv)


def _serve(fv):
  import json
  from sinkformer import bench
  result = bench.get("serve")(fv.run, fv.clients, fv.duration_s, fv.http_unlearns,
                              fv.cli_unlearns, fv.max_tokens, fv.max_batch)
  print(json.dumps({"bench": "serve", **result}))


def _stream_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_string("data", None, "prepared data (a 'data prepare' --out) to stream instead "
                      "of the config's", flag_values=fv)
  flags.DEFINE_list("workers", ["0", "1", "2", "4"], "reader thread counts to time (0: "
                    "batches made on the consuming thread)", flag_values=fv)
  flags.DEFINE_integer("rows", 64, "rows per batch (with --data)", flag_values=fv)
  flags.DEFINE_integer("seq_len", 128, "tokens per row (with --data)", flag_values=fv)
  flags.DEFINE_integer("max_docs", 32, "documents per row at most (with --data; wiki_1b: 32)",
                       flag_values=fv)
  flags.DEFINE_integer("rounds", 10, "timed rounds of the train step (with --config)",
                       flag_values=fv)


def _stream(fv):
  from sinkformer import bench
  from sinkformer.errors import UserError
  if (fv.config is None) == (fv.data is None):
    raise UserError("bench stream takes --config or --data (prepared data), one of them")
  bench.get("stream")(fv.config, rounds=fv.rounds, data=fv.data,
               workers=[int(w) for w in fv.workers], rows=fv.rows, seq_len=fv.seq_len,
               max_docs=fv.max_docs)


def _scale_flags(fv, argv):
  flags.DEFINE_integer("docs", 6_000_000, "generated one-document sources", flag_values=fv)
  flags.DEFINE_string("dir", None, "working directory (the generated corpus is reused)",
                      flag_values=fv)
  flags.DEFINE_integer("group_size", 1, "ArrayRecord group size of the prepared shards",
                       flag_values=fv)


def _scale(fv):
  from sinkformer import bench
  bench.get("scale")(fv.docs, fv.dir, group_size=fv.group_size)


def _bench_run_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_integer("rounds", 10, "timed rounds", flag_values=fv)


def _bench_generate(fv):
  from sinkformer import bench
  bench.get("generate")(fv.run, fv.rounds)


def _bench_route(fv):
  from sinkformer import bench
  bench.get("route")(fv.run)


def _bench_probes_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_string("facts", None, "facts.jsonl ('sinkformer data encyclopedia')",
                      flag_values=fv)
  flags.DEFINE_integer("count", 1000, "probes to score", flag_values=fv)


def _bench_probes(fv):
  from sinkformer import bench
  bench.get("probes")(fv.run, fv.facts, fv.count)


def _bench_unlearn_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_string("catalog", None, "a prepared catalog.sqlite to unlearn from (e.g. the "
                      "6M-source one of 'bench scale'); default: the run's", flag_values=fv)
  flags.DEFINE_integer("requests", 200, "single-source requests timed", flag_values=fv)


def _bench_unlearn(fv):
  from sinkformer import bench
  bench.get("unlearn")(fv.run, fv.catalog, fv.requests)


COMMANDS = {
    "bench sinks": Command(
        "time the NULL train step against the equal-size dense control",
        flags=_bench_flags, action=lambda fv: _bench(fv, "sinks"), required=("config",)),
    "bench devices": Command(
        "time the train step on one device against all devices (set "
        "JAX_NUM_CPU_DEVICES=8 to simulate 8 on a CPU)",
        flags=_bench_flags, action=lambda fv: _bench(fv, "devices"), required=("config",)),
    "bench stream": Command(
        "tokens/s of the data pipeline per reader thread count, against the "
        "train step (--config) or on prepared data (--data)",
        flags=_stream_flags, action=_stream, required=()),
    "bench scale": Command(
        "prepare a generated corpus of millions of sources; memory, catalog "
        "lookups, first batch",
        flags=_scale_flags, action=_scale, required=("dir",)),
    "bench checkpoint": Command(
        "time an async checkpoint save against the train step",
        flags=_bench_flags, action=lambda fv: _bench(fv, "checkpoint"), required=("config",)),
    "bench mfu": Command(
        "compile seconds, first step, step time, tokens/s and MFU of the NULL and "
        "the dense control on synthetic rows of the config's shape (JSON line too)",
        flags=_bench_flags, action=lambda fv: _bench(fv, "mfu"), required=("config",)),
    "bench attention": Command(
        "forward+backward time of each attention backend this platform runs, "
        "on packed rows of the config's heads",
        flags=_attention_flags, action=_attention, required=("config",)),
    "bench memory": Command(
        "per remat policy: memory per device per micro-batch row (XLA's "
        "analysis) and the largest micro-batch this device holds",
        flags=_memory_flags, action=_memory, required=("config",)),
    "bench generate": Command(
        "generation tokens/s with the KV cache against without",
        flags=_bench_run_flags, action=_bench_generate, required=("run",)),
    "bench route": Command(
        "routing top-1 accuracy: each surviving source's title routed back to it",
        flags=lambda fv, argv: run_flag(fv), action=_bench_route, required=("run",)),
    "bench probes": Command(
        "seconds to score N probe facts under one condition (batched)",
        flags=_bench_probes_flags, action=_bench_probes, required=("run", "facts")),
    "bench serve": Command(
        "load test of a 'sinkformer serve' process with HTTP and CLI unlearns "
        "and clients that hang up: latency, tokens/s, 5xx, and tokens sent from "
        "a source after its unlearn returned (must be 0)",
        flags=_serve_flags, action=_serve, required=("run",)),
    "bench unlearn": Command(
        "unlearn latency, request to effect on the next generation",
        flags=_bench_unlearn_flags, action=_bench_unlearn, required=("run",)),

}
