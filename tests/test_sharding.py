"""8 simulated CPU devices: every mesh layout trains like one device; checkpoints move meshes."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, shutil, sys
import jax, numpy as np
from sinkformer import checkpoint, config
from sinkformer.train import trainer

root = sys.argv[1]
def run(name, mesh, devices, steps=4):
  cfg = config.load("experiments/quickstart.py:smoke", (
      "--config.model.num_kv_heads=2", f"--config.train.steps={steps}",
      "--config.train.warmup_steps=1", "--config.train.log_every=1",
      "--config.train.eval_every=0", "--config.train.checkpoint_every=2"))
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  state, hist = trainer.train(cfg, f"{root}/{name}", devices=devices)
  return [h["loss"] for h in hist], jax.device_get(state["params"])

out, params = {}, {}
for mesh in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
  name = ",".join(map(str, mesh))
  out[name], params[name] = run(name, mesh, jax.devices()[:int(np.prod(mesh))])

# Resume the (2,2,2) run from its step-2 checkpoint on an (8,1,1) mesh.
shutil.copytree(f"{root}/2,2,2", f"{root}/moved")
shutil.rmtree(f"{root}/moved/checkpoints/4")
(open(f"{root}/moved/metrics.jsonl", "w").close())
out["moved"], params["moved"] = run("moved", (8, 1, 1), jax.devices())
diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params["moved"], params["2,2,2"])
out["moved_max_param_diff"] = max(jax.tree.leaves(diff))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_meshes_agree_and_checkpoints_restore_onto_another_mesh(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one = out["1,1,1"]
  assert len(one) == 4
  for mesh in ("8,1,1", "2,4,1", "2,2,2"):
    assert out[mesh] == pytest.approx(one, rel=1e-5), mesh
  assert out["moved"] == pytest.approx(out["2,2,2"][2:], rel=1e-5)   # steps 3 and 4 again
  assert out["moved_max_param_diff"] < 1e-5
