"""Flags and argument handling that several command groups share."""

from __future__ import annotations

import dataclasses
from typing import Callable

from absl import flags

from sinkformer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Command:
  """One `sinkformer` command: what it does (the help line), how it defines its flags
  (`flags(fv, argv)`), what runs it (`action(fv)`, or `action(fv, positional)` when it takes
  `args`), and the flags it cannot run without."""
  summary: str
  flags: Callable
  action: Callable
  required: tuple[str, ...] = ()
  args: str | None = None   # the positional arguments it takes, e.g. "SOURCE..."


def run_flag(fv):
  flags.DEFINE_string("run", None, "the run directory (sinkformer train --workdir)",
                      flag_values=fv)


def refs(args, file) -> list[str]:
  """Source references from positional arguments and/or a file (one per line)."""
  from sinkformer.data import pipeline
  out = list(args)
  if file:
    out += pipeline.parse_refs("@" + file)
  if not out:
    raise UserError("name at least one source (id:N, key:K, title:T, group:G, or a bare "
                    "name), or --file")
  return out
