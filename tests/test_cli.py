"""The `sinkformer` command as a user meets it: help, one-line errors, a real run, the bench."""

import json
import subprocess
import sys

import pytest


def cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "sinkformer", *args], capture_output=True,
                        text=True, timeout=timeout)


def test_help_lists_every_command():
  from sinkformer.cli import COMMANDS
  out = cli("--help")
  assert out.returncode == 0
  for name in COMMANDS:
    assert name in out.stdout
  sub = cli("train", "--help")
  assert sub.returncode == 0 and "--workdir" in sub.stdout and "--config" in sub.stdout


@pytest.mark.parametrize("args,needle", [
    (("train", "--config", "experiments/quickstart.py"), "--workdir is required"),
    (("train", "--config", "experiments/nope.py", "--workdir", "x"), "nope.py"),
    (("train", "--config", "experiments/quickstart.py", "--workdir", "x",
      "--config.model.d_modle=3"), 'Did you mean "d_model"'),
    (("train", "--config", "experiments/quickstart.py", "--workdir", "x",
      "--config.sinks.k=9999"), "config.sinks.k:"),
    (("train", "--config", "experiments/quickstart.py", "--workdir", "x",
      "--config.mesh.data=2"), "config.mesh:"),
    (("frobnicate",), "unknown command"),
    (("train", "--bogus=1"), "bogus"),
])
def test_user_mistakes_are_one_line_errors(args, needle, tmp_path):
  out = cli(*args)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("sinkformer: error:") and needle in lines[0]


def test_train_command_runs_and_reports(tmp_path):
  out = cli("train", "--config", "experiments/quickstart.py:smoke", "--workdir", str(tmp_path),
            "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=4")
  assert out.returncode == 0, out.stderr
  steps = [l for l in out.stdout.splitlines() if l.startswith("step ")]
  assert len(steps) == 2 and steps[-1].startswith("step 4/4")
  for field in ("loss", "tok/s", "MFU", "ETA"):
    assert field in steps[-1]
  assert any(l.startswith("eval 4:") for l in out.stdout.splitlines())
  assert (tmp_path / "metrics.jsonl").exists()


def test_bench_sinks_prints_a_json_ratio():
  out = cli("bench", "sinks", "--config", "experiments/quickstart.py:smoke", "--rounds", "2")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["bench"] == "sinks" and result["ratio"] > 0
  assert result["params"]["null"] == result["params"]["dense"]


def test_bench_checkpoint_prints_its_figures():
  out = cli("bench", "checkpoint", "--config", "experiments/quickstart.py:smoke", "--rounds", "2")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["bench"] == "checkpoint" and result["bytes"] > 4 * result["params"]
  assert result["save_total_s"] >= result["save_blocking_s"] > 0
