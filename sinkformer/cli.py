"""The `sinkformer` command line: `sinkformer COMMAND [flags]`, `sinkformer --help`.

Each command parses its own absl flags; `--config` is an ml_collections config file with
presets after ':' and `--config.a.b=v` overrides (typos rejected). Mistakes a user can fix
print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from absl import flags

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


def _bench_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_integer("rounds", 30, "timed rounds (each times every variant once)",
                       flag_values=fv)


def _bench(fv, name):
  from sinkformer import bench
  bench.BENCHES[name](fv.config, rounds=fv.rounds)


def _checkpoint_info_flags(fv, argv):
  flags.DEFINE_string("checkpoint", None, "a run's checkpoints/ directory (newest step) or "
                      "checkpoints/STEP", flag_values=fv)


def _checkpoint_info(fv):
  from sinkformer import checkpoint
  for key, value in checkpoint.info(fv.checkpoint).items():
    print(f"{key}: {value}")


def _plan_flags(fv, argv):
  define_config_flag(fv, argv)


def _plan(fv):
  from sinkformer import plan
  plan.print_plan(plan.plan(fv.config))


COMMANDS = {
    "train": ("train a NULL (or the dense control) from an experiment config",
              _train_flags, _train, ("config", "workdir")),
    "plan": ("parameters, FLOPs/token and per-device memory of a config's mesh, before "
             "renting hardware (plus XLA's analysis when enough devices exist)",
             _plan_flags, _plan, ("config",)),
    "checkpoint info": ("step, config summary, parameter count and parameter hash of a "
                        "checkpoint (restored on one CPU)", _checkpoint_info_flags,
                        _checkpoint_info, ("checkpoint",)),
    "bench sinks": ("time the NULL train step against the equal-size dense control",
                    _bench_flags, lambda fv: _bench(fv, "sinks"), ("config",)),
    "bench checkpoint": ("time an async checkpoint save against the train step",
                         _bench_flags, lambda fv: _bench(fv, "checkpoint"), ("config",)),
}


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
  summary, define, action, required = COMMANDS[name]
  fv = flags.FlagValues()
  define(fv, [PROG, *rest])
  if any(a in ("-h", "--help") for a in rest):
    print(f"usage: {PROG} {name} [flags]\n\n{summary}\n\n{fv.get_help()}")
    return 0
  try:
    fv([f"{PROG} {name}", *rest])
    if "config" in fv and fv.config is not None:
      fv.config.to_dict()   # config files load lazily: surface a load error here
    for flag in required:
      if fv[flag].value is None:
        raise UserError(f"--{flag} is required; see '{PROG} {name} --help'")
  except PARSE_ERRORS as e:
    raise UserError(one_line(e)) from None
  action(fv)
  return 0


def main():
  try:
    sys.exit(run(sys.argv[1:]))
  except UserError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    sys.exit(130)
