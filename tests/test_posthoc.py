"""Post-hoc baselines and the relearning loop: the published losses, and they move."""

import math

import jax
import numpy as np
import pytest

from sinkformer import config, engine
from sinkformer.eval import posthoc


@pytest.fixture(scope="module")
def dense():
  cfg = config.load("experiments/quickstart.py:smoke,dense")
  setup = engine.build(cfg, jax.devices()[:1])
  params = engine.init_state(setup, 0)["params"]
  rng = np.random.default_rng(0)
  docs = [[1, *rng.integers(6, 200, 20).tolist()] for _ in range(8)]
  return setup, params, posthoc.rows(docs, np.arange(1, 9), 4)


def test_losses_at_the_start(dense):
  setup, params, batches = dense
  nll = posthoc.nll(setup, params, batches[:1], "dense", None)
  ga = posthoc.Finetuner(setup, params, "ga", 1e-3, mode="dense")
  assert ga.step(batches[0]) == pytest.approx(-nll, rel=1e-5)
  npo = posthoc.Finetuner(setup, params, "npo", 1e-3, beta=0.1, mode="dense")
  # pi == pi_ref at the start: -(2/beta) log sigmoid(0) = 20 ln 2
  assert npo.step(batches[0]) == pytest.approx(20 * math.log(2), rel=1e-5)
  with_retain = posthoc.Finetuner(setup, params, "npo", 1e-3, beta=0.1, mode="dense")
  retain_nll = posthoc.nll(setup, params, batches[1:2], "dense", None)
  assert with_retain.step(batches[0], batches[1]) == pytest.approx(20 * math.log(2) + retain_nll,
                                                                   rel=1e-5)


def test_ascent_raises_and_relearning_lowers_the_forget_loss(dense):
  setup, params, batches = dense
  before = posthoc.nll(setup, params, batches, "dense", None)
  for method, sign in (("ga", 1), ("relearn", -1)):
    tuner = posthoc.Finetuner(setup, params, method, 3e-3, mode="dense")
    for i in range(4):
      tuner.step(batches[i % 2])
    after = posthoc.nll(setup, tuner.params, batches, "dense", None)
    assert sign * (after - before) > 0.05, (method, before, after)
