"""The cluster launchers: SLURM (run for real under a stand-in srun) and Cloud TPU VMs (dry run)."""

import os
import random
import subprocess
import sys

import pytest

from test_multiprocess import ARGS, losses, run_single

FAKE_SRUN = """#!/bin/bash
# stand-in for srun: SLURM_NTASKS local tasks, each with the variables SLURM gives it
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_SRUN_LOGS/task_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_slurm_script_trains_on_two_tasks_like_one_process(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "sinkformer").write_text(f'#!/bin/bash\nexec {sys.executable} -m sinkformer "$@"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SRUN_LOGS": str(tmp_path),
         "SINKFORMER": str(bin_dir / "sinkformer"), "SLURM_JOB_ID": str(random.randrange(4096)),
         "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost",
         "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
  config, *overrides = ARGS[1:]
  out = subprocess.run(["bash", "launch/slurm.sbatch", config, str(tmp_path / "run"), *overrides],
                       env=env, capture_output=True, text=True, timeout=600)
  logs = [(tmp_path / f"task_{i}.log").read_text() for i in (0, 1)]
  assert out.returncode == 0, out.stdout + out.stderr + logs[0] + logs[1]
  assert "'data': 4" in logs[0] and "step " not in logs[1]   # one mesh over both tasks
  assert losses(tmp_path / "run") == pytest.approx(run_single(tmp_path / "one", 1), rel=1e-5)


def test_tpu_vm_script_commands():
  env = {**os.environ, "DRY_RUN": "1", "TYPE": "v5p-16", "ZONE": "us-east5-a", "PROJECT": "p"}
  run = lambda *a: subprocess.run(["bash", "launch/tpu_vm.sh", *a], env=env, capture_output=True,
                                  text=True, timeout=60)
  create = run("create", "vm1")
  assert create.returncode == 0 and create.stdout.split() == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "vm1", "--accelerator-type=v5p-16",
      "--version=v2-alpha-tpuv5", "--zone=us-east5-a", "--project=p"]
  train = run("run", "vm1", "--", "sinkformer", "train", "--config", "experiments/wiki_1b.py:v5p_128")
  assert train.returncode == 0 and "--worker=all" in train.stdout
  assert ".venv/bin/sinkformer\\ train\\ --config\\ experiments/wiki_1b.py:v5p_128" in train.stdout
  assert "--worker=3" in run("logs", "vm1", "3").stdout
  assert "delete vm1 --quiet" in run("delete", "vm1").stdout
  bad = run("explode", "vm1")
  assert bad.returncode == 2 and "unknown action" in bad.stderr
