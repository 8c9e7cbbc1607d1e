"""The same run on 1 device, 4 simulated devices, and 2 real processes x 2 devices."""

import json
import os
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


@pytest.mark.slow
def test_data_parallel_and_multi_process_runs_match_one_device(tmp_path):
  one = run_single(tmp_path / "one", 1)
  four = run_single(tmp_path / "four", 4)
  out = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--devices", "2",
                        "--logs", str(tmp_path / "logs"), "--", "sinkformer", "train", *ARGS,
                        "--workdir", str(tmp_path / "mp")], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr + (tmp_path / "logs" / "process_1.log").read_text()
  assert "'data': 4" in out.stdout               # one mesh over both processes' devices
  assert not (tmp_path / "logs" / "process_1.log").read_text().count("step ")  # only 0 logs
  multi = losses(tmp_path / "mp")
  assert len(one) == 4
  assert four == pytest.approx(one, rel=1e-5)
  assert multi == pytest.approx(one, rel=1e-5)


def test_a_failing_process_fails_the_launch(tmp_path):
  out = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--logs",
                        str(tmp_path), "--", sys.executable, "-c",
                        "import os, sys; sys.exit(3 if os.environ['SINKFORMER_PROCESS_ID'] == '1' else 0)"],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 3 and "a process failed" in out.stderr
