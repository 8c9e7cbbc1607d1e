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
def run(name, mesh, devices, steps=4, sync="micro"):
  cfg = config.load("experiments/quickstart.py:smoke", (
      "--config.model.num_kv_heads=2", f"--config.train.steps={steps}", f"--config.train.sync={sync}",
      "--config.train.warmup_steps=1", "--config.train.log_every=1",
      "--config.train.eval_every=0", "--config.train.checkpoint_every=2"))
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  state, hist = trainer.train(cfg, f"{root}/{name}", devices=devices)
  return [h["loss"] for h in hist], jax.device_get(state["params"])

out, params = {}, {}
for mesh in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
  name = ",".join(map(str, mesh))
  out[name], params[name] = run(name, mesh, jax.devices()[:int(np.prod(mesh))])
out["step"], _ = run("step", (2, 4, 1), jax.devices(), sync="step")   # gathered once per step

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
  for mesh in ("8,1,1", "2,4,1", "2,2,2", "step"):
    assert out[mesh] == pytest.approx(one, rel=1e-5), mesh
  assert out["moved"] == pytest.approx(out["2,2,2"][2:], rel=1e-5)   # steps 3 and 4 again
  assert out["moved_max_param_diff"] < 1e-5


LAYOUT = r"""
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from sinkformer import config, engine
from sinkformer.data import pipeline
from sinkformer.model import attention, transformer
from sinkformer.parallel import mesh as mesh_lib
from sinkformer.train import trainer

out = {}
for mesh in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
  cfg = config.load("experiments/quickstart.py:smoke", ("--config.model.num_kv_heads=2",))
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  setup = engine.build(cfg)
  state = engine.init_state(setup, 0)
  axes = transformer.abstract(setup.dims)[2]
  want = jax.tree.map(lambda a: mesh_lib.spec(a), axes, is_leaf=lambda x: isinstance(x, tuple))
  got = jax.tree.map(lambda a: a.sharding.spec, state["params"])
  mu = state["opt"][1][0].mu
  rows = engine.process_rows(setup)
  batch = engine.put_batch(setup, pipeline.load(cfg, lambda *_: 0).train.batch(0, rows), rows)
  hlo = trainer.compile_train_step(setup, state, batch).as_text()
  name = ",".join(map(str, mesh))
  # parameter-shaped all-gathers (whole stacks or one layer's slice): what FSDP implies
  shapes = ({a.shape for a in jax.tree.leaves(state["params"])}
            | {a.shape[1:] for a in jax.tree.leaves(state["params"]["blocks"])})
  gathered = [tuple(int(d) for d in dims.split(",")) for dims in
              re.findall(r"= \w+\[([\d,]+)\]\S* all-gather(?:-start)?\(", hlo)]
  out[name] = {
      "params_follow_rules": jax.tree.leaves(jax.tree.map(lambda a, b: a == b, got, want)),
      "moments_follow_params": jax.tree.leaves(jax.tree.map(
          lambda a, b: a.sharding.spec == b.sharding.spec, mu, state["params"])),
      "split_params": sum(not a.sharding.is_fully_replicated
                          for a in jax.tree.leaves(state["params"])),
      "counters_replicated": all(a.sharding.spec == jax.sharding.PartitionSpec()
                                 for a in (state["step"], state["opt"][1][0].count)),
      "embed_spec": str(state["params"]["embed"]["embedding"].sharding.spec),
      "batch_spec": str(batch["tokens"].sharding.spec),
      "param_gathers": sum(g in shapes and len(g) >= 2 for g in gathered),
      "collectives": {op: len(re.findall(rf" {op}(-start)?\(", hlo))
                      for op in ("all-gather", "reduce-scatter", "all-reduce")}}

# A fused kernel runs per shard (rows over data/fsdp, heads over tensor) and equals XLA.
mesh = mesh_lib.make_mesh((2, 2, 2), jax.devices())
key = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(key[0], (4, 128, 4, 32))
k, v = (jax.random.normal(x, (4, 128, 2, 32)) for x in key[1:])
seg = jnp.asarray(np.repeat([[1] * 50 + [2] * 60 + [0] * 18], 4, 0), jnp.int32)
with jax.set_mesh(mesh):
  fused = jax.jit(lambda *a: attention.packed(*a, "splash"))(q, k, v, seg)
out["sharded_kernel_max_diff"] = float(jnp.abs(fused - attention.packed(q, k, v, seg, "xla")).max())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_parameters_moments_and_collectives_follow_the_sharding_rules():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
  proc = subprocess.run([sys.executable, "-c", LAYOUT], env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for mesh in ("8,1,1", "1,8,1", "2,2,2"):
    got = out[mesh]
    assert all(got["params_follow_rules"]) and all(got["moments_follow_params"]), mesh
    assert got["counters_replicated"] and got["batch_spec"] == "P(('data', 'fsdp'),)"
    assert got["collectives"]["all-reduce"] + got["collectives"]["reduce-scatter"] > 0   # grads
  # Data parallel keeps whole parameters: nothing to gather. FSDP splits every matrix over
  # d_model and gathers it before use; with tensor parallelism too, both axes split.
  assert out["8,1,1"]["split_params"] == 0 and out["8,1,1"]["param_gathers"] == 0
  fsdp = out["1,8,1"]
  assert fsdp["split_params"] == 9            # every matrix: embeddings, q/k/v/o, gate/up/down
  assert fsdp["param_gathers"] >= fsdp["split_params"]      # each gathered before use
  assert fsdp["embed_spec"] == "P('tensor', 'fsdp')"
  assert out["2,2,2"]["split_params"] == 9 and out["2,2,2"]["param_gathers"] > 0
  assert out["sharded_kernel_max_diff"] < 1e-4


COMMS = r"""
import json, jax, numpy as np
from sinkformer import config, engine
from sinkformer.data import pipeline
from sinkformer.parallel import comms, mesh as mesh_lib
from sinkformer.train import trainer

out = {}
for mesh, sync in [((1, 8, 1), "micro"), ((2, 4, 1), "step")]:
  cfg = config.load("experiments/quickstart.py:smoke,bf16", (
      "--config.model.num_kv_heads=2", "--config.train.batch_size=16",
      "--config.train.grad_accum=2", f"--config.train.sync={sync}"))
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  setup = engine.build(cfg)
  state = engine.abstract_state(setup)
  batch = {k: jax.ShapeDtypeStruct((16, cfg.data.seq_len), np.int32, sharding=setup.batch_sharding)
           for k in pipeline.FIELDS}
  with mesh_lib.using(setup.mesh):
    _, hlo = comms.partitioned(trainer.jit_train_step(setup, batch).lower(state, batch))
  got = comms.read(hlo)
  out[sync] = {"weight_gathers": [(c.dtype, c.runs) for c in got if c.op == "all-gather"
                                  and c.bytes >= 4096 and c.dtype[0] in "bf"],   # not token ids
               "reductions": {op: sum(c.runs for c in got if c.op == op and c.bytes >= 4096)
                              for op in ("all-reduce", "reduce-scatter")},
               "reduced_dtypes": sorted({c.dtype for c in got if c.op == "reduce-scatter"}),
               "split": sum(not s.spec == jax.sharding.PartitionSpec(*[None] * len(s.spec))
                            for s in jax.tree.leaves(setup.state_shardings["params"]))}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_weights_move_in_bf16_and_step_sync_reduces_each_gradient_once():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
  proc = subprocess.run([sys.executable, "-c", COMMS], env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  micro, step = out["micro"], out["step"]
  # FSDP: every weight gathered in bf16, per layer and micro-batch; gradients reduced each time
  assert micro["weight_gathers"] and {d for d, _ in micro["weight_gathers"]} == {"bf16"}
  assert sum(r for _, r in micro["weight_gathers"]) >= 2 * 2 * 7   # micro-batches x layers x matrices
  assert micro["reductions"]["all-reduce"] >= 2 * 2 * 7
  # once per step: each split parameter gathered once (bf16) and its gradient reduce-scattered
  # once, in float32, whatever the number of micro-batches and layers
  assert {d for d, _ in step["weight_gathers"]} == {"bf16"}
  assert [r for _, r in step["weight_gathers"]] == [1] * step["split"]
  assert step["reductions"]["reduce-scatter"] == step["split"] == 9
  assert step["reduced_dtypes"] == ["f32"]
