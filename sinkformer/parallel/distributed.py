"""Joining JAX's multi-controller runtime: one process per host (or per GPU), same program.

Explicit: `--coordinator HOST:PORT --num_processes N --process_id I` (or the SINKFORMER_*
environment variables that launch/local.py sets). Automatic: on Cloud TPU VMs and under
SLURM, `jax.distributed.initialize()` finds its peers itself. Otherwise: one process.
"""

from __future__ import annotations

import os

import jax

ENV = ("SINKFORMER_COORDINATOR", "SINKFORMER_NUM_PROCESSES", "SINKFORMER_PROCESS_ID")


def _cluster_detected() -> bool:
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
  return slurm or tpu_pod


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  coordinator = coordinator or os.environ.get(ENV[0])
  if num_processes is None and ENV[1] in os.environ:
    num_processes = int(os.environ[ENV[1]])
  if process_id is None and ENV[2] in os.environ:
    process_id = int(os.environ[ENV[2]])
  if coordinator or _cluster_detected():
    # CPU devices need a collectives transport across processes; GPUs/TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
