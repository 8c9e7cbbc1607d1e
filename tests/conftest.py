import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # configs are addressed as experiments/NAME.py, as a user would
# Tests never see corpora a user fetched: an empty data dir unless a test makes one.
os.environ["SINKFORMER_DATA"] = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                             f"sinkformer-test-data-{os.getpid()}")


@pytest.fixture
def smoke_cfg():
  from sinkformer import config
  return config.load("experiments/quickstart.py:smoke")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A tiny NULL trained on the built-in corpus (copy it before changing its switchboard)."""
  from sinkformer import config
  from sinkformer.train import trainer
  cfg = config.load("experiments/quickstart.py:smoke")
  cfg.train.update(steps=40, eval_every=0, log_every=20, checkpoint_every=40)
  path = tmp_path_factory.mktemp("trained_run")
  trainer.train(cfg, str(path))
  return str(path)


@pytest.fixture
def fresh_run(trained_run, tmp_path):
  """A copy of `trained_run` that a test may change (unlearn, serve): without the router
  cache and live-server records a use of the original may have left."""
  shutil.copytree(trained_run, tmp_path / "run",
                  ignore=shutil.ignore_patterns("router.npz", "servers"))
  return str(tmp_path / "run")
