"""A run directory, as every layer above the engine reads it: its config (over today's base),
the data it really trained on, and the run restored for use. Its switchboard (the sources'
status and ledger) lives beside this module.

  RUN/config.json        the config it was trained with
  RUN/checkpoints/       Orbax checkpoints (checkpoint.py)
  RUN/sources.sqlite     the switchboard (switchboard.py), ledger.jsonl its journal
  RUN/metrics.jsonl, sources.jsonl, tb/   what training reported
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from sinkformer import checkpoint, config as config_lib, storage
from sinkformer.engine import Setup, abstract_state, build, single_device_setup
from sinkformer.errors import UserError


def load_config(run_dir: str):
  """A run's config.json over the base config: fields added since the run was made (the
  `unlearn` and `eval` sections, execution choices) get their defaults."""
  try:
    raw = json.loads((storage.path(run_dir) / "config.json").read_text())
  except OSError:
    raise UserError(f"{run_dir} is not a sinkformer run (no config.json)") from None
  return ml_collections.ConfigDict(config_lib.merged(config_lib.base().to_dict(), raw))


def trained_config(run_dir: str):
  """(config, data identity) of a run, with data.corpus pinned to what it really trained on
  (a fallback or a corpus prepared by the trainer)."""
  cfg = load_config(run_dir)
  ckpts, step = checkpoint.locate(storage.checkpoints_of(run_dir))
  identity = ckpts.meta(step).get("data", {"corpus": "builtin"})
  ckpts.close()
  if identity.get("corpus") == "builtin":
    cfg.data.corpus = "builtin"
  elif len(identity["corpora"]) == 1:
    cfg.data.corpus = identity["corpora"][0]["path"]
  return cfg, identity


@dataclasses.dataclass
class Run:
  """A trained run restored for use: its config, Setup, checkpoint step, state and metadata."""
  dir: str | None   # None: restored from a bare checkpoint directory
  cfg: object
  setup: Setup
  step: int
  state: dict
  meta: dict

  @property
  def params(self):
    return self.state["params"]

  @property
  def identity(self) -> dict:
    """What data the run trained on (tokenizer and catalog hashes, corpus paths)."""
    return self.meta.get("data", {"corpus": "builtin"})


def load_run(path: str, step: int | None = None, devices=None) -> Run:
  """A run restored for use, onto `devices` (default: one device, whatever mesh it was
  trained on). `path` is a run directory (its newest checkpoint, or `step`) or a
  checkpoint directory `.../checkpoints[/STEP]` (config from the checkpoint's metadata)."""
  is_run = (storage.path(path) / "config.json").exists()
  where = storage.checkpoints_of(path) if is_run else path
  ckpts, step = checkpoint.locate(f"{where.rstrip('/')}/{step}" if step is not None else where)
  try:
    cfg = (load_config(path) if is_run else ml_collections.ConfigDict(
        config_lib.merged(config_lib.base().to_dict(), ckpts.meta(step)["config"])))
    setup = single_device_setup(cfg) if devices is None else build(cfg, devices)
    state, meta = ckpts.restore(step, abstract_state(setup))
  finally:
    ckpts.close()
  return Run(path if is_run else None, cfg, setup, step, state, meta)
