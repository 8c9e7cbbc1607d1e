import os
import pathlib

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
