"""`sinkformer story` end to end at smoke scale: every phase runs and writes its tables."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_story_runs_every_phase_and_resumes(tmp_path):
  env = {**os.environ, "SINKFORMER_DATA": str(tmp_path / "data")}
  args = [sys.executable, "-m", "sinkformer", "story", "--config", "experiments/quickstart.py:smoke",
          "--workdir", str(tmp_path / "s"), "--people", "40", "--forget-count", "4", "--attack-steps", "2"]
  out = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  for phase in ("train null", "train oracle", "train dense", "post-hoc npo", "post-hoc ga",
                "facts:", "mia:", "extraction:", "relearn:", "gcg:", "capability:"):
    assert f"=== {phase}" in out.stdout
  assert "unlearned 4 sources" in out.stdout and "before, source:person-000000" in out.stdout
  assert out.stdout.splitlines()[-1].startswith(f"next: sinkformer serve --run {tmp_path}/s/null")
  facts = json.loads((tmp_path / "s" / "eval" / "facts.json").read_text())
  assert {"sink-on", "retrain", "dense", "npo", "ga"} <= {r["condition"] for r in facts["rows"]}
  page = (tmp_path / "s" / "eval" / "index.md").read_text()
  for name in ("facts", "mia", "extraction", "relearn", "gcg", "capability"):   # every table
    assert (tmp_path / "s" / "eval" / f"{name}.md").read_text() in page
  gcg = json.loads((tmp_path / "s" / "eval" / "gcg.json").read_text())
  assert gcg["budget"]["steps"] == 10 and {"npo", "ga"} <= {r["condition"] for r in gcg["rows"]}
  again = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
  assert again.returncode == 0 and "=== train null" not in again.stdout   # nothing retrained
  assert "unlearned 0 sources" in again.stdout
  assert again.stdout.count("| sink-on |") >= 2   # tables measured before are shown again
