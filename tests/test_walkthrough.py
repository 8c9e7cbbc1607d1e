"""The README's walkthrough (from a corpus to a served model with deletions), run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough() -> str:
  text = README.read_text()
  section = text.split("### From your corpus to a served model with deletions", 1)[1]
  return re.search(r"```bash\n(.*?)\n```\n", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
  repo = README.parent
  (tmp_path / "experiments").symlink_to(repo / "experiments")
  env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
  got = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
  assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
  out = got.stdout
  assert "['run', 'run@route', 'run@backbone', 'run@placebo']" in out
  assert "refused: " in out and "unlearned" in out.split("refused: ")[1]
  assert (tmp_path / "my/run/eval/index.md").exists()
  assert (tmp_path / "my/hf/model.safetensors").exists()
