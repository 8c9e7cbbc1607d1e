"""Device mesh and logical-to-physical sharding rules (MaxText style).

Parameters and activations are named with *logical* axes; RULES maps each to a mesh axis (or
to none: replicated). Changing the parallelism of a run means changing the mesh shape in the
config, never the model. Activations are pinned to the rules at block boundaries
(`constrain`) whenever a function is traced under its mesh (`jax.set_mesh`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sinkformer.config import MESH_AXES

RULES = {
    # parameters
    "layers": None,            # the stacked blocks' leading axis (scanned, never split)
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
}


def make_mesh(shape: tuple[int, ...], devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices()).reshape(shape)
  return Mesh(devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def spec(logical_axes) -> PartitionSpec:
  """The PartitionSpec of logical axes (None: an axis never split)."""
  return PartitionSpec(*(None if a is None else RULES[a] for a in logical_axes))


def param_shardings(axes_tree, mesh: Mesh):
  """NamedSharding for every parameter from its logical axes (a tuple leaf)."""
  return jax.tree.map(lambda axes: NamedSharding(mesh, spec(axes)), axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays: rows split over data and fsdp, sequence whole."""
  return NamedSharding(mesh, spec(("batch",)))


def constrain(x, logical_axes):
  """Pin activation `x` to the rules when tracing under a mesh; a no-op without one (a
  single-device function needs no layout)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
