"""What every user of a model needs, and only that: a config built on a mesh (`Setup`), its
train state, the forward pass under any sink mode, and feeding host rows to the mesh. A
trained run on disk is read by run/directory.py.

Training (train/trainer.py), serving, generation, GCG, post-hoc fine-tuning and
`checkpoint info` all import this module.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sinkformer import config as config_lib, privacy
from sinkformer.model import sinks, transformer
from sinkformer.parallel import mesh as mesh_lib


@dataclasses.dataclass(eq=False)   # hashed by identity: a static argument of jitted functions
class Setup:
  """Everything derived from a config that the step functions close over."""
  cfg: object
  mesh: jax.sharding.Mesh
  dims: transformer.Dims
  spec: sinks.SinkSpec | None   # None: the dense control
  graphdef: object
  state_shardings: dict         # {"step", "params", "opt"} -> NamedSharding trees
  schedule: optax.Schedule
  tx: optax.GradientTransformation

  @property
  def max_docs(self) -> int:    # document slots per row; slot 0 is padding
    return self.cfg.data.max_docs_per_row + 1

  @property
  def batch_sharding(self):
    return mesh_lib.batch_sharding(self.mesh)


def make_optimizer(cfg, dims) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup-cosine and global-norm clipping; norms are not decayed.

  A NULL may train its backbone (every parameter outside the sink units, attention and
  embeddings included) differently, to keep source-specific facts out of it:
  train.backbone_lr_scale multiplies the backbone's updates, train.backbone_decay_scale its
  weight decay."""
  t = cfg.train
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, t.warmup_steps, t.steps, end_value=t.lr * t.min_lr_ratio)
  decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  plain = t.backbone_lr_scale == 1 and t.backbone_decay_scale == 1
  if cfg.model.kind == "dense" or plain:   # (the optimizer state of older checkpoints)
    adam = optax.adamw(schedule, t.b1, t.b2, weight_decay=t.weight_decay, mask=decay)
  else:
    backbone = transformer.backbone_units(dims, cfg.sinks.attn_heads)
    adam = optax.chain(optax.scale_by_adam(t.b1, t.b2),
                       _backbone_scaled(backbone, t.weight_decay, t.backbone_lr_scale,
                                        t.backbone_decay_scale),
                       optax.scale_by_learning_rate(schedule))
  if privacy.enabled(cfg):   # noise on the backbone, no global clip (privacy.py)
    noise = privacy.backbone_noise(t.dp.noise * t.dp.clip / privacy.normalizer(cfg),
                                   transformer.backbone_units(dims, cfg.sinks.attn_heads),
                                   cfg.seed)
    return optax.chain(noise, adam), schedule
  return optax.chain(optax.clip_by_global_norm(t.clip_norm), adam), schedule


def _backbone_scaled(backbone, weight_decay, lr_scale, decay_scale) -> optax.GradientTransformation:
  """AdamW's decoupled decay (matrices only) with the backbone's (`backbone` 1, sinks 0)
  update scaled by `lr_scale` and its decay by `decay_scale`."""
  def update(updates, state, params):
    def one(u, b, p):
      out = u * (1 + (lr_scale - 1) * b)
      if p.ndim >= 2:
        out = out + weight_decay * (1 + (decay_scale - 1) * b) * p
      return out
    return jax.tree.map(one, updates, backbone, params), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def build(cfg, devices=None, platform: str | None = None, device=None) -> Setup:
  """`cfg` on a mesh of `devices` (default: all; a number: an abstract mesh of that many
  `device`s, mesh.abstract_mesh's, to lower for), its kernels chosen for `platform`
  (default: this process's; another one to lower for it, e.g. "gpu" on a CPU)."""
  devices = jax.devices() if devices is None else devices
  if isinstance(devices, int):
    mesh = mesh_lib.abstract_mesh(config_lib.validate(cfg, devices), device)
  else:
    mesh = mesh_lib.make_mesh(config_lib.validate(cfg, len(devices)), devices,
                              config_lib.dcn_shape(cfg.mesh))
  dims = transformer.Dims.from_config(cfg, platform)
  graphdef, abstract_params, axes = transformer.abstract(dims)
  tx, schedule = make_optimizer(cfg, dims)
  return Setup(cfg, mesh, dims, sinks.SinkSpec.from_config(cfg), graphdef,
               _state_shardings(tx, abstract_params, axes, mesh), schedule, tx)


def _state_shardings(tx, abstract_params, axes, mesh) -> dict:
  """Optimizer moments are laid out like their parameters; counters are replicated."""
  params = mesh_lib.param_shardings(axes, mesh)
  rep = mesh_lib.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, sharding: sharding,
                              jax.eval_shape(tx.init, abstract_params), params,
                              transform_non_params=lambda _: rep)
  return {"step": rep, "params": params, "opt": opt}


def _init(setup: Setup, seed: int) -> dict:
  params = transformer.init(setup.dims, seed)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": setup.tx.init(params)}


def init_state(setup: Setup, seed: int) -> dict:
  """The whole train state created directly in its shards (nothing on one device first)."""
  return jax.jit(partial(_init, setup, seed), out_shardings=setup.state_shardings)()


def abstract_state(setup: Setup) -> dict:
  """Shapes, dtypes and shardings of the train state on this run's mesh (a restore target)."""
  shapes = jax.eval_shape(partial(_init, setup, 0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, setup.state_shardings)


def logits_in_mode(setup: Setup, params, batch, mode: str = "train", exclude=None):
  """The model's logits [B, T, V] on packed rows under an apply mode of sinks.MODES."""
  gate = None
  if setup.spec is not None and mode != "dense":
    gate = sinks.make_gate(setup.spec, mode, segment_ids=batch["segment_ids"],
                           source_ids=batch["source_ids"], row_sources=batch.get("row_sources"),
                           exclude=exclude, max_docs=setup.max_docs)
  return transformer.apply(setup.graphdef, params, batch, gate)


def token_losses(setup: Setup, params, batch, mode: str = "train", exclude=None):
  """(nll[B, T] masked to real targets, mask[B, T]) under an apply mode of sinks.MODES."""
  logits = logits_in_mode(setup, params, batch, mode, exclude)
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * mask
  return nll, mask


def process_rows(setup: Setup) -> np.ndarray:
  """The global batch's rows this process feeds: those its devices hold under the batch
  sharding (with a hybrid mesh they need not be one contiguous block)."""
  shape = (setup.cfg.train.batch_size, setup.cfg.data.seq_len)
  held = setup.batch_sharding.addressable_devices_indices_map(shape).values()
  return np.unique(np.concatenate([np.arange(shape[0])[index[0]] for index in held]))


def put_batch(setup: Setup, local: dict, rows: np.ndarray | None = None) -> dict:
  """Host numpy arrays of this process's `rows` (process_rows; default: the whole batch) ->
  global jax.Arrays sharded over the mesh."""
  rows = np.arange(setup.cfg.train.batch_size) if rows is None else rows
  position = np.full(setup.cfg.train.batch_size, -1)
  position[rows] = np.arange(len(rows))
  def put(value):
    shape = (setup.cfg.train.batch_size,) + value.shape[1:]
    return jax.make_array_from_callback(
        shape, setup.batch_sharding, lambda index: value[position[np.arange(shape[0])[index[0]]]])
  return {k: put(v) for k, v in local.items()}


_SETUPS: dict[str, Setup] = {}


def single_device_setup(cfg) -> Setup:
  """One single-device Setup per architecture and optimizer config. Jitted functions take the
  Setup as a static argument (hashed by identity), so runs that share one (a NULL and its
  retrain oracle; the dense control and its post-hoc copies) share compiled code too."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  key = json.dumps([cfg.model.to_dict(), cfg.sinks.to_dict(), cfg.train.to_dict(),
                    cfg.data.max_docs_per_row], sort_keys=True)
  if key not in _SETUPS:
    _SETUPS[key] = build(cfg, jax.devices()[:1])
  return _SETUPS[key]
