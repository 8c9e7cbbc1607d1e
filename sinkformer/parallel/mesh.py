"""Device mesh and logical-to-physical sharding rules (MaxText style).

Parameters and activations are named with *logical* axes; RULES maps each to a mesh axis (or
to none: replicated). Changing the parallelism of a run means changing the mesh shape in the
config, never the model.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sinkformer.config import MESH_AXES

RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
}


def make_mesh(shape: tuple[int, ...], devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices()).reshape(shape)
  return Mesh(devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def spec(logical_axes) -> PartitionSpec:
  return PartitionSpec(*(RULES[a] for a in logical_axes))


def param_shardings(axes_tree, mesh: Mesh):
  """NamedSharding for every parameter from its logical axes (a tuple leaf)."""
  return jax.tree.map(lambda axes: NamedSharding(mesh, spec(axes)), axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays: rows split over data and fsdp, sequence whole."""
  return NamedSharding(mesh, spec(("batch",)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
