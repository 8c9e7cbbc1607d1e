"""Checkpoints: exact resume after SIGKILL / SIGTERM, damaged checkpoints, wrong configs."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sinkformer import checkpoint, config, engine

from sinkformer.run import directory
from sinkformer.errors import UserError
from sinkformer.train import trainer

ARGS = ["--config", "experiments/quickstart.py:smoke", "--config.train.steps=10",
        "--config.train.checkpoint_every=2", "--config.train.log_every=1",
        "--config.train.eval_every=0"]


def train_cmd(workdir):
  return [sys.executable, "-m", "sinkformer", "train", *ARGS, "--workdir", str(workdir)]


def final_hash(workdir):
  return checkpoint.params_hash(directory.load_run(str(workdir)).params)


def logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(l)["step"] for l in path.read_text().splitlines()] if path.exists() else []


def interrupt(workdir, sig, after_step):
  """Start training, send `sig` once `after_step` steps are logged, return the process."""
  proc = subprocess.Popen(train_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 300
  while not any(s >= after_step for s in logged_steps(workdir)):
    assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
    time.sleep(0.05)
  proc.send_signal(sig)
  proc.wait(timeout=300)
  return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  subprocess.run(train_cmd(workdir), check=True, capture_output=True, timeout=600)
  return final_hash(workdir)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
  proc = interrupt(tmp_path, signal.SIGKILL, after_step=5)
  assert proc.returncode == -signal.SIGKILL
  assert max(logged_steps(tmp_path)) < 10
  out = subprocess.run(train_cmd(tmp_path), check=True, capture_output=True, text=True,
                       timeout=600)
  assert "resumed from" in out.stdout
  assert final_hash(tmp_path) == uninterrupted


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_where_it_stopped_and_resumes_exactly(tmp_path, uninterrupted,
                                                                      sig):
  proc = interrupt(tmp_path, sig, after_step=3)
  output = proc.stdout.read()
  assert proc.returncode == 128 + sig, output
  stopped = max(logged_steps(tmp_path))
  assert f"{sig.name}: stopped after step {stopped}, checkpoint saved" in output
  assert "to resume, run the same command again: sinkformer train --config" in output
  assert "Traceback" not in output
  assert checkpoint.locate(str(tmp_path / "checkpoints"))[1] == stopped
  assert not list((tmp_path / "checkpoints").glob("*tmp*"))   # no half-written save
  subprocess.run(train_cmd(tmp_path), check=True, capture_output=True, timeout=600)
  assert final_hash(tmp_path) == uninterrupted


@pytest.mark.slow
def test_ctrl_c_during_compilation_stops_cleanly(tmp_path):
  """Ctrl-C while XLA compiles (the run's first minutes) used to end in a segfault: now
  it waits for the compile, runs no step and exits 130 with the resume line."""
  proc = subprocess.Popen(train_cmd(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:   # the model line comes just before compilation
    lines.append(line)
    if " model: " in line:
      break
  proc.send_signal(signal.SIGINT)
  output = "".join(lines) + proc.stdout.read()
  proc.wait(timeout=300)
  assert proc.returncode == 130, output
  assert "SIGINT: stopped before step 1; nothing new to save" in output, output
  assert "Segmentation" not in output and "Traceback" not in output
  assert logged_steps(tmp_path) == []


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted):
  subprocess.run(train_cmd(tmp_path), check=True, capture_output=True, timeout=600)
  data = tmp_path / "checkpoints" / "10" / "state"
  victim = max((p for p in data.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(victim, "r+b") as f:
    f.truncate(victim.stat().st_size // 2)
  out = subprocess.run(train_cmd(tmp_path), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert "checkpoints/10 is unreadable" in out.stderr
  assert "resumed from" in out.stdout and sum(l.startswith("step ") for l in out.stdout.splitlines()) == 2   # steps 9, 10 again
  assert (tmp_path / "checkpoints" / "10.damaged").is_dir()
  assert final_hash(tmp_path) == uninterrupted


def test_a_checkpoint_from_another_architecture_is_refused(smoke_cfg, tmp_path):
  smoke_cfg.train.update(steps=3, eval_every=0, log_every=1)
  trainer.train(smoke_cfg, str(tmp_path))
  other = config.load("experiments/quickstart.py:smoke", ("--config.sinks.k=4",
                                                          "--config.sinks.seed=7"))
  other.train.update(steps=4, eval_every=0)
  with pytest.raises(UserError) as e:
    trainer.train(other, str(tmp_path))
  assert "sinks.k: checkpoint 8 != config 4" in str(e.value)
  assert "sinks.seed: checkpoint 0 != config 7" in str(e.value)
  # Other shapes are refused before any array is read, and nothing in the run changes.
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  wider = config.load("experiments/quickstart.py:smoke", ("--config.model.d_model=32",))
  with pytest.raises(UserError, match="model.d_model: checkpoint 64 != config 32"):
    trainer.train(wider, str(tmp_path))
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
  assert checkpoint.locate(str(tmp_path / "checkpoints"))[1] == 3
  # How the model runs is not what it is: another remat/attention/loop resumes.
  smoke_cfg.model.update(remat="full", scan_layers=False)
  smoke_cfg.train.steps = 4
  trainer.train(smoke_cfg, str(tmp_path))
  assert checkpoint.locate(str(tmp_path / "checkpoints"))[1] == 4


def unrolled(tree, layers):
  """`tree` in the layout of checkpoints written before the blocks were stacked."""
  if isinstance(tree, dict):
    return {k: {i: jax.tree.map(lambda a: a[i], v) for i in range(layers)} if k == "blocks"
            else unrolled(v, layers) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(unrolled(x, layers) for x in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(unrolled(x, layers) for x in tree)
  return tree


def test_a_checkpoint_of_the_unrolled_layout_is_converted_on_restore(smoke_cfg, tmp_path):
  setup = engine.build(smoke_cfg)
  state = engine.init_state(setup, 0)
  state["opt"] = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x,
                              state["opt"])   # moments worth checking
  (tmp_path / "config.json").write_text(smoke_cfg.to_json())
  old = unrolled(state, smoke_cfg.model.num_layers)
  assert set(old["params"]["blocks"]) == {0, 1}
  ckpts = checkpoint.Checkpoints(str(tmp_path / "checkpoints"), every=1, keep=None)
  ckpts.save(7, old, {"config": json.loads(smoke_cfg.to_json())}, force=True)
  ckpts.wait()
  ckpts.close()
  run = directory.load_run(str(tmp_path))
  assert jax.tree.structure(run.state) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(run.state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, want)


def test_checkpoint_info_reports_the_trained_parameters(smoke_cfg, tmp_path):
  smoke_cfg.train.update(steps=3, eval_every=0, log_every=1, checkpoint_every=2)
  state, _ = trainer.train(smoke_cfg, str(tmp_path))
  out = subprocess.run([sys.executable, "-m", "sinkformer", "checkpoint", "info",
                        "--checkpoint", str(tmp_path / "checkpoints" / "3")],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = dict(l.split(": ", 1) for l in out.stdout.strip().splitlines())
  assert lines["step"] == "3"
  assert lines["hash"] == checkpoint.params_hash(state["params"])
  missing = subprocess.run([sys.executable, "-m", "sinkformer", "checkpoint", "info",
                            "--checkpoint", str(tmp_path / "checkpoints" / "5")],
                           capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2 and "complete steps: [2, 3]" in missing.stderr
