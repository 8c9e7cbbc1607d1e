"""The `sinkformer` command line: `sinkformer COMMAND [flags]`, `sinkformer --help`.

Commands live with their noun (train.py, data.py, sources.py, eval.py, bench.py). Each parses
its own absl flags; `--config` is an ml_collections config file with presets after ':' and
`--config.a.b=v` overrides (typos rejected). Mistakes a user can fix print one line and exit
2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import shlex
import sys

from absl import flags

from sinkformer import storage
from sinkformer.cli import bench, data, eval as eval_cmds, sources, train
from sinkformer.errors import PARSE_ERRORS, Stopped, UserError, one_line

PROG = "sinkformer"
# name -> (summary, define_flags(fv, argv), action, required flags[, positional arguments])
COMMANDS = {**train.COMMANDS, **data.COMMANDS, **sources.COMMANDS, **eval_cmds.COMMANDS,
            **bench.COMMANDS}


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
  with _local_run(fv):
    action(fv, leftover) if args else action(fv)
  return 0


@contextlib.contextmanager
def _local_run(fv):
  """A command on a run in a bucket (--run gs://...) works on the run's local mirror, which
  is pushed back when it ends (storage.run_dir)."""
  if "run" not in fv or fv.run is None:
    yield
    return
  with storage.run_dir(fv.run) as local:
    fv.run = local
    yield


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
  except Stopped as e:   # saved where it was: the same command continues
    print(f"{PROG}: {e}; to resume, run the same command again: "
          f"{shlex.join([PROG, *sys.argv[1:]])}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    sys.exit(130)
