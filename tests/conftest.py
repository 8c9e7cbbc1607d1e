import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # configs are addressed as experiments/NAME.py, as a user would


@pytest.fixture
def smoke_cfg():
  from sinkformer import config
  return config.load("experiments/quickstart.py:smoke")
