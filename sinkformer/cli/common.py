"""Flags and argument handling that several command groups share."""

from __future__ import annotations

from absl import flags

from sinkformer.errors import UserError


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
