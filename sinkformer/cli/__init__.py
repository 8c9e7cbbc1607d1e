"""The `sinkformer` command line: `sinkformer COMMAND [flags]`, `sinkformer --help`.

Commands live with their noun (train.py, data.py, sources.py, eval.py, bench.py). Each parses
its own absl flags; `--config` is an ml_collections config file with presets after ':' and
`--config.a.b=v` overrides (typos rejected). Mistakes a user can fix print one line and exit
2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import textwrap

from absl import flags

from sinkformer import config as config_lib, storage
from sinkformer.cli import bench, configs, data, eval as eval_cmds, sources, train
from sinkformer.errors import PARSE_ERRORS, Stopped, UserError, one_line

PROG = "sinkformer"
# name -> its Command (cli/common.py)
GROUPS = {"train and size runs": train.COMMANDS, "configs": configs.COMMANDS,
          "data": data.COMMANDS, "unlearn, serve, export": sources.COMMANDS,
          "measure forgetting": eval_cmds.COMMANDS, "benchmarks": bench.COMMANDS}
COMMANDS = {name: c for group in GROUPS.values() for name, c in group.items()}
DIRECTORIES = ("run", "workdir", "out", "data_dir", "checkpoint", "tfds_dir")


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"usage: {PROG} COMMAND [flags]   ({PROG} COMMAND --help for its flags)", "",
           "sinkformer trains natively unlearnable language models (NULLs) and measures how",
           "well they forget."]
  for title, group in GROUPS.items():
    lines += ["", f"{title}:"]
    lines += [f"  {name:{width}s}  {command.summary}" for name, command in group.items()]
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
  command = COMMANDS[name]
  rest = [_underscored(a) for a in rest]
  fv = flags.FlagValues()
  command.flags(fv, [PROG, *rest])
  if any(a in ("-h", "--help") for a in rest):
    print(_help(name, command, fv))
    return 0
  try:
    leftover = fv([f"{PROG} {name}", *rest])[1:]
    if leftover and not command.args:
      raise UserError(f"unexpected argument(s) {' '.join(leftover)}; see '{PROG} {name} --help'")
    for flag in command.required:
      if fv[flag].value is None:
        raise UserError(f"--{flag.replace('_', '-')} is required; see '{PROG} {name} --help'")
    if "config" in fv and fv.config is not None:
      fv.config.to_dict()   # config files load lazily: surface a load error here
  except PARSE_ERRORS as e:
    overrides = [a for a in rest if a.startswith("--config.")]
    spec = next((a.split("=", 1)[1] if "=" in a else b for a, b in zip(rest, rest[1:] + [None])
                 if a == "--config" or a.startswith("--config=")), None)
    hint = None
    if overrides and spec:
      with contextlib.suppress(UserError):
        hint = config_lib.unknown_field(spec, overrides)
    raise UserError(hint or one_line(e)) from None
  _check_directories(fv)
  with _local_run(fv):
    command.action(fv, leftover) if command.args else command.action(fv)
  return 0


def _check_directories(fv):
  """Paths that cannot work, said before anything heavy is imported: a run that is not
  there, a directory flag that names a file. (A missing checkpoint step is said where the
  steps that exist are known.)"""
  for flag in DIRECTORIES:
    where = fv[flag].value if flag in fv else None
    if not where or storage.is_remote(where):
      continue
    if os.path.isfile(where):
      raise UserError(f"--{flag.replace('_', '-')} {where} is a file; name a directory")
    if flag == "run" and not os.path.exists(where):
      raise UserError(f"--run {where} does not exist (a run directory is what "
                      f"'{PROG} train --workdir DIR' writes)")


def _help(name: str, command, fv) -> str:
  """A command's flags with hyphens, required ones first, absl's own flags left out."""
  own = [f for module, fl in fv.flags_by_module_dict().items() if module != "absl.flags"
         for f in fl]
  required = command.required
  own.sort(key=lambda f: (f.name not in required, f.name))
  lines = [f"usage: {PROG} {name} " + " ".join(f"--{f.replace('_', '-')} {_metavar(fv[f])}"
                                                for f in required)
           + " [flags]" + (f" {command.args}" if command.args else ""), "", command.summary]
  for title, group in (("required", [f for f in own if f.name in required]),
                       ("options", [f for f in own if f.name not in required])):
    if group:
      lines += ["", f"{title}:"]
    for f in group:
      dashed = f.name.replace("_", "-")
      head = f"--[no-]{dashed}" if f.flag_type() == "bool" else f"--{dashed} {_metavar(f)}"
      default = "" if f.default in (None, "") or f.name in required else \
          f" (default: {f.default_as_str.strip(chr(39))})"
      lines.append(f"  {head}")
      text = re.sub(r"^<[^>]*>: ", "", " ".join(f.help.split()))   # absl's enum prefix
      lines += textwrap.wrap(text + default, 88, initial_indent=" " * 6,
                             subsequent_indent=" " * 6)
  return "\n".join(lines)


def _metavar(f) -> str:
  values = getattr(f.parser, "enum_values", None)
  kind = f.flag_type()
  return ("FILE[:PRESETS]" if f.name == "config" else "|".join(values) if values else
          "DIR" if f.name in DIRECTORIES else "N" if kind == "int" else "X" if kind == "float"
          else "A,B,..." if "list" in kind else "TEXT (repeatable)" if "multi" in kind else
          "VALUE")


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
  except BrokenPipeError:   # `sinkformer ... | head`: the reader has what it wanted
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    sys.exit(130)
