"""The same run on 1 device, 8 simulated devices, and 2 real processes x 4 devices."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ARGS = ["--config", "experiments/quickstart.py:smoke", "--config.train.steps=4",
        "--config.train.log_every=1", "--config.train.eval_every=0"]


def losses(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(l)["loss"] for l in lines]


def run_single(workdir, devices):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
  subprocess.run([sys.executable, "-m", "sinkformer", "train", *ARGS, "--workdir", str(workdir)],
                 env=env, check=True, capture_output=True, timeout=600)
  return losses(workdir)


def launch(workdir, logs):
  return subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--devices", "4",
                         "--logs", str(logs), "--", "sinkformer", "train", *ARGS,
                         "--config.train.checkpoint_every=2", "--workdir", str(workdir),
                         "--config.mesh.dcn_data=2"],   # a hybrid mesh: each process a slice
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_from_their_checkpoint(tmp_path):
  one = run_single(tmp_path / "one", 1)
  eight = run_single(tmp_path / "eight", 8)
  out = launch(tmp_path / "mp", tmp_path / "logs")
  assert out.returncode == 0, out.stderr + (tmp_path / "logs" / "process_1.log").read_text()
  assert "'data': 8" in out.stdout               # one mesh over both processes' devices
  assert "step " not in (tmp_path / "logs" / "process_1.log").read_text()   # only 0 logs
  multi = losses(tmp_path / "mp")
  assert len(one) == 4
  assert eight == pytest.approx(one, rel=1e-5)
  assert multi == pytest.approx(one, rel=1e-5)

  # Lose the last checkpoint and the log, then let both processes resume from step 2.
  shutil.rmtree(tmp_path / "mp" / "checkpoints" / "4")
  (tmp_path / "mp" / "metrics.jsonl").unlink()
  again = launch(tmp_path / "mp", tmp_path / "logs")
  assert again.returncode == 0, again.stderr
  assert "resumed from" in again.stdout
  assert losses(tmp_path / "mp") == pytest.approx(one[2:], rel=1e-5)


def test_a_failing_process_fails_the_launch(tmp_path):
  out = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--logs",
                        str(tmp_path), "--", sys.executable, "-c",
                        "import os, sys; sys.exit(3 if os.environ['SINKFORMER_PROCESS_ID'] == '1' else 0)"],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 3 and "a process failed" in out.stderr
