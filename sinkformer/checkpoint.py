"""Orbax checkpoints of the whole train state, and finding the newest one that is intact.

A checkpoint holds `state` (step, params, optimizer) and `meta` (the config, the data's
identity, the mesh layout, and how many rows each epoch of the data plan held, so a resume
need not plan the epochs behind it). The data position needs no field of its own: batches
are a pure function of the step. Saves are asynchronous; Orbax only lists a step once it has committed,
so a process killed mid-save leaves nothing that restore would pick up.

Block parameters are stacked over a leading layers axis. Checkpoints written before that
(`blocks/0 .. blocks/L-1`, in parameters and optimizer moments alike) are converted on
restore: read layer by layer into the current mesh, then stacked.
"""

from __future__ import annotations

import hashlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import PartitionSpec as P

from sinkformer import storage
from sinkformer.errors import UserError

# Fields that change the meaning of the weights: a checkpoint may not be resumed under others,
# except for these, which only say how the model runs.
ARCHITECTURE = ("model", "sinks")
EXECUTION = ("model.attention", "model.remat", "model.scan_layers")


def params_hash(params) -> str:
  """sha256 over every parameter's bytes in tree order (identical runs, identical hash)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


def differences(saved: dict, current: dict, sections=ARCHITECTURE) -> list[str]:
  """What differs between two configs (as dicts) in the sections that define the weights."""
  out = []
  for section in sections:
    a, b = saved.get(section, {}), current.get(section, {})
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key) and f"{section}.{key}" not in EXECUTION:
        out.append(f"{section}.{key}: checkpoint {a.get(key)!r} != config {b.get(key)!r}")
  return out


def data_differences(saved: dict, current: dict) -> list[str]:
  """Tokenizer, corpus and catalog identity (data.Data.identity) that differ."""
  flat = lambda d: {"corpus": d.get("corpus"), "tokenizer": d.get("tokenizer_sha256"),
                    **{f"corpora[{i}].{k}": v for i, c in enumerate(d.get("corpora", []))
                       for k, v in c.items() if k != "path"}}
  a, b = flat(saved), flat(current)
  return [f"data {k}: checkpoint {a.get(k)!r} != now {b.get(k)!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Checkpoints:

  def __init__(self, directory: str, every: int, keep: int):
    self.directory = directory if storage.is_remote(directory) else os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True,
            create=True, cleanup_tmp_directories=True),   # what a killed save left behind
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """meta: {"config": ..., "data": data identity} (JSON-able); the step is added."""
    meta = {"step": step, **meta}
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, step: int, abstract_state):
    """(state, meta) of `step`, laid out as `abstract_state` (shapes and shardings)."""
    target = _unstacked(abstract_state) if self._unrolled(step) else abstract_state
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state = out["state"]
    if target is not abstract_state:
      shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
      state = jax.jit(lambda s: _map_blocks(s, _stack), out_shardings=shardings)(state)
    return state, out["meta"]

  def _unrolled(self, step: int) -> bool:
    """Whether `step` has the blocks of the unrolled layout (blocks/0, blocks/1, ...)."""
    tree = self.manager.item_metadata(step)["state"]
    blocks = getattr(tree, "tree", tree)["params"]["blocks"]
    return all(str(key).isdigit() for key in blocks)

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state, check=lambda meta: None):
    """(state, meta) of the newest checkpoint that restores, or None if there is none.
    `check(meta)` runs before any array is read (it raises to refuse the checkpoint).

    A damaged newest checkpoint is reported and skipped in favour of the one before it.
    """
    for step in reversed(self.steps()):
      try:
        meta = self.meta(step)
      except Exception as e:  # any damage: a missing file, bad bytes, a truncated array
        self._set_aside(step, e)
        continue
      check(meta)
      try:
        return self.restore(step, abstract_state)
      except Exception as e:
        self._set_aside(step, e)
    return None

  def _set_aside(self, step: int, error: Exception):
    aside = f"{self.directory}/{step}.damaged"
    print(f"warning: checkpoint {self.directory}/{step} is unreadable "
          f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
          f"moved to {aside}, trying the previous one", file=sys.stderr)
    if jax.process_index() == 0:   # kept for inspection, out of the way of a new save
      epath.Path(f"{self.directory}/{step}").rename(aside)
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def locate(path: str) -> tuple[Checkpoints, int]:
  """(checkpoints, step) for a run's checkpoint DIR (its newest step) or DIR/STEP."""
  path = path.rstrip("/") if storage.is_remote(path) else os.path.abspath(path)
  base, _, tail = path.rpartition("/")
  directory, step = (base, int(tail)) if tail.isdigit() else (path, None)
  if not storage.path(directory).is_dir():
    raise UserError(f"no checkpoint directory at {directory}")
  ckpts = Checkpoints(directory, every=1, keep=None)
  steps = ckpts.steps()
  if step is None and steps:
    step = steps[-1]
  if step not in steps:
    raise UserError(f"no complete checkpoint {path}; complete steps: {steps or 'none'}")
  return ckpts, step


def _map_blocks(tree, fn):
  """`tree` with every `blocks` subtree (parameters and optimizer moments) replaced by fn(it)."""
  if isinstance(tree, dict):
    return {k: fn(v) if k == "blocks" else _map_blocks(v, fn) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):   # optimizer states
    return type(tree)(*(_map_blocks(x, fn) for x in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(_map_blocks(x, fn) for x in tree)
  return tree


def _unstacked(abstract_state):
  """The unrolled layout's restore target: blocks {0: ..., L-1: ...} without the layers axis."""
  def layer(a):
    sharding = jax.sharding.NamedSharding(a.sharding.mesh, P(*a.sharding.spec[1:]))
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sharding)

  def split(blocks):
    count = jax.tree.leaves(blocks)[0].shape[0]
    return {i: jax.tree.map(layer, blocks) for i in range(count)}
  return _map_blocks(abstract_state, split)


def _stack(blocks: dict):
  return jax.tree.map(lambda *layers: jnp.stack(layers), *(blocks[i] for i in sorted(blocks)))
