"""Device mesh and logical-to-physical sharding rules (MaxText style).

Parameters and activations are named with *logical* axes; RULES maps each to a mesh axis (or
to none: replicated). Changing the parallelism of a run means changing the mesh shape in the
config, never the model. Activations are pinned to the rules at block boundaries
(`constrain`) whenever a function is traced under its mesh (`jax.set_mesh`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sinkformer.config import MESH_AXES
from sinkformer.errors import ConfigError

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


def make_mesh(shape: tuple[int, ...], devices=None, dcn: tuple[int, ...] = (1, 1, 1)) -> Mesh:
  """The (data, fsdp, tensor) mesh of `shape` over `devices`, laid out by the topology:
  neighbouring mesh positions are neighbouring chips (mesh_utils), and with `dcn` > 1 an
  axis is split into slices (TPU multi-slice) or processes (GPU hosts), the slow network
  outermost. A subset of the devices (tests, benchmarks) is laid out in order."""
  devices = list(jax.devices() if devices is None else devices)
  ici = tuple(size // d for size, d in zip(shape, dcn))
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  granules = slices if slices > 1 else len({d.process_index for d in devices})
  if math.prod(dcn) > 1 and granules == math.prod(dcn):   # TPU slices, or GPU hosts
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                process_is_granule=slices == 1)
  elif math.prod(dcn) > 1 and devices[0].platform != "cpu":
    raise ConfigError("mesh.dcn_data", f"dcn_data*dcn_fsdp = {math.prod(dcn)} slices/hosts, but "
                      f"the devices span {granules}")
  elif len(devices) == jax.device_count() and devices[0].platform != "cpu":
    grid = mesh_utils.create_device_mesh(shape, devices)
  else:   # simulated CPU devices or a subset (tests, plan, benchmarks): in order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def abstract_mesh(shape: tuple[int, ...], device=None) -> jax.sharding.AbstractMesh:
  """The (data, fsdp, tensor) mesh of `shape` without devices: enough to lower a step for a
  platform this process does not have (plan --platform). `device`: (platform, device kind,
  cores) of the chip to lower for, which kernels consult (jax >= 0.11 has a place for it)."""
  kinds = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if device is None or not hasattr(jax.sharding, "AbstractDevice"):
    return jax.sharding.AbstractMesh(tuple(shape), MESH_AXES, axis_types=kinds)
  platform, kind, cores = device
  return jax.sharding.AbstractMesh(tuple(shape), MESH_AXES, axis_types=kinds,
                                   abstract_device=jax.sharding.AbstractDevice(
                                       device_kind=kind, num_cores=cores, platform=platform))


def using(mesh):
  """The context to trace a step under: the mesh (activation constraints and kernels see
  it), or an abstract mesh alone."""
  if isinstance(mesh, Mesh):
    return jax.set_mesh(mesh)
  return jax.sharding.use_abstract_mesh(mesh)


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
  """Pin activation `x` to the rules when tracing under a mesh, over the axes the
  partitioner still owns here (inside a shard_map some are manual); a no-op without a mesh
  (a single-device function needs no layout)."""
  free = free_axes(include_trivial=True)
  if not free:
    return x
  return jax.lax.with_sharding_constraint(x, over(spec(logical_axes), free))


def free_axes(include_trivial: bool = False) -> tuple[str, ...]:
  """The mesh axes traced code may still partition over: not manual (inside a shard_map),
  and, unless `include_trivial`, of size > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(a for a in mesh.axis_names if a not in mesh.manual_axes
               and (include_trivial or mesh.shape[a] > 1))


def over(partition: PartitionSpec, axes) -> PartitionSpec:
  """`partition` with only the mesh `axes` kept."""
  def keep(entry):
    kept = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a in axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept
  return PartitionSpec(*(None if e is None else keep(e) for e in partition))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
