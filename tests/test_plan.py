"""`sinkformer plan`: sizes from the sharding rules, XLA's analysis when devices exist."""

import json
import subprocess
import sys

import pytest

from sinkformer import config
from sinkformer.model import transformer
from sinkformer.train import plan


def test_1b_plan_shards_the_state_over_its_mesh_without_devices():
  cfg = config.load("experiments/wiki_1b.py:h100x8")
  result = plan.plan(cfg)
  n = transformer.count_params(transformer.abstract(transformer.Dims.from_config(cfg))[1])
  assert result["parameters"] == n and 1.0e9 <= n <= 1.2e9
  assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  # fsdp=8 splits every matrix over d_model (960 = 8 x 120): 1/8 of 4 bytes per parameter
  assert result["params_bytes_per_device"] == pytest.approx(4 * n / 8, rel=0.01)
  assert result["optimizer_bytes_per_device"] == pytest.approx(2 * 4 * n / 8, rel=0.01)
  assert "JAX_NUM_CPU_DEVICES=8" in result["xla"]


def test_quickstart_plan_compiles_every_remat_policy_and_the_unrolled_layout():
  result = plan.plan(config.load("experiments/quickstart.py"), unrolled=True)
  assert result["unrolled"]["xla_flops_per_step_per_device"] == pytest.approx(
      result["flops_per_step"], rel=0.25)
  temp = {r: got["memory_per_device"]["temp"] for r, got in result["compiled"].items()}
  assert temp["full"] < temp["dots"] < temp["none"]        # what each policy saves
  extra = {r: got["recompute_flops_per_step"] for r, got in result["compiled"].items()}
  assert extra["none"] == 0 < extra["dots"] < extra["full"]


def test_plan_command_prints_a_summary():
  out = subprocess.run([sys.executable, "-m", "sinkformer", "plan", "--config",
                        "experiments/wiki_1b.py:v5p_128"], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert "parameters: 1,006,695,360" in out.stdout and "per device:" in out.stdout


LOWER = r"""
import json, sys
from sinkformer import config
from sinkformer.train import plan
cfg = config.load("experiments/wiki_1b.py:h100x8", (f"--config.mesh.fsdp={sys.argv[2]}",))
print(json.dumps(plan.lower(cfg, sys.argv[1])))
"""


@pytest.mark.parametrize("platform,backend", [("cuda", "pallas"), ("tpu", "splash")])
@pytest.mark.parametrize("devices", [1, 8])
def test_the_1b_train_step_lowers_for_gpus_and_tpus_with_their_kernels(platform, backend, devices):
  """The whole 32-layer step (scanned, remat as configured) with the platform's attention
  kernel, lowered on an abstract mesh: no accelerator, nothing allocated. One process per
  lowering, as `plan --platform` runs: jax's lowering caches do not expect one process to
  lower a kernel for several platforms and meshes."""
  proc = subprocess.run([sys.executable, "-c", LOWER, platform, str(devices)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (got["platform"], got["devices"], got["attention"]) == (platform, devices, backend)
  assert got["layers"] == 32 and got["remat"] == "dots"
  assert got["kernel_calls"] >= 3   # forward (and its recomputation), dK/dV, dQ


def test_plan_lowers_for_a_platform_from_the_command_line():
  out = subprocess.run([sys.executable, "-m", "sinkformer", "plan", "--config",
                        "experiments/wiki_1b.py:h100x8", "--platform", "cuda"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "lowered for cuda on 8 device(s)" in out.stdout and "attention pallas" in out.stdout
