"""The source-private backbone (train.dp, privacy.py): the gradient it clips and the noise it
adds, what a neighbour can tell apart, and the accounting."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from sinkformer import config, engine, privacy
from sinkformer.data import pipeline
from sinkformer.errors import ConfigError
from sinkformer.model import transformer
from sinkformer.train import trainer

ONE_A_ROW = ("--config.data.max_docs_per_row=1",)


def setup_and_batches(*overrides, steps=1):
  cfg = config.load("experiments/quickstart.py:smoke", ONE_A_ROW + overrides)
  setup = engine.build(cfg)
  data = pipeline.load(cfg, lambda *_: 0)
  return cfg, setup, [engine.put_batch(setup, data.train.batch(s)) for s in range(steps)]


def test_with_no_clip_and_no_noise_it_is_the_plain_gradient():
  """Clip infinite: the private step's summed gradient is the plain one (to float
  reassociation: rows are summed one by one), and zero noise adds exactly nothing."""
  cfg, setup, (batch,) = setup_and_batches("--config.train.dp.clip=1e30")
  params = engine.init_state(setup, 0)["params"]
  plain = jax.jit(lambda p, b: trainer._accumulate(setup, p, b))(params, batch)
  private = jax.jit(lambda p, b: trainer._private(setup, p, b))(params, batch)
  for a, b in zip(jax.tree.leaves(private[0]), jax.tree.leaves(plain[0])):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())
  assert [float(x) for x in private[1:3]] == pytest.approx([float(x) for x in plain[1:3]])
  noise = privacy.backbone_noise(0.0, transformer.backbone_units(setup.dims), 0)
  out, _ = noise.update(plain[0], noise.init(params))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain[0])))


def test_each_rows_backbone_gradient_is_clipped_and_the_sinks_are_not():
  cfg, setup, (batch,) = setup_and_batches("--config.train.dp.clip=1e-3")
  params = engine.init_state(setup, 0)["params"]
  grads, *_ = jax.jit(lambda p, b: trainer._private(setup, p, b))(params, batch)
  plain, *_ = jax.jit(lambda p, b: trainer._accumulate(setup, p, b))(params, batch)
  backbone = transformer.backbone_units(setup.dims)
  part = lambda tree, keep: jax.tree.map(lambda g, m: g * (m if keep else 1 - m), tree, backbone)
  norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))
  rows = int((np.asarray(batch["loss_mask"]).sum(1) > 0).sum())
  assert norm(part(grads, True)) <= 1e-3 * rows * (1 + 1e-5)   # each row at most the clip
  assert norm(part(plain, True)) > 100 * 1e-3 * rows
  for a, b in zip(jax.tree.leaves(part(grads, False)), jax.tree.leaves(part(plain, False))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)   # the sinks: untouched


def test_noise_goes_to_the_backbone_only_and_resumes_from_its_state():
  backbone = {"w": np.asarray([[1.0, 0.0]], np.float32)}   # column 0 backbone, 1 a sink
  noise = privacy.backbone_noise(0.5, backbone, seed=3)
  g = {"w": jnp.zeros((4, 2))}
  state = noise.init(g)
  first, state2 = noise.update(g, state)
  assert np.all(first["w"][:, 1] == 0) and np.std(first["w"][:, 0]) > 0.1
  again, _ = noise.update(g, state)   # the same state: the same draw (an exact resume)
  np.testing.assert_array_equal(first["w"], again["w"])
  second, _ = noise.update(g, state2)
  assert not np.array_equal(first["w"], second["w"])


def _neighbours(noise: float, steps: int = 6):
  """Backbone parameters after `steps` private steps with source X, without it (its rows
  emptied: the add/remove neighbour, same batches otherwise), and with it under another
  noise seed."""
  cfg, setup, batches = setup_and_batches("--config.train.dp.clip=0.05",
                                          f"--config.train.dp.noise={noise}", steps=steps)
  x = int(np.asarray(batches[0]["source_ids"]).max(1)[0])   # the first row's source
  without = [{**b, "loss_mask": jnp.where(b["source_ids"].max(1, keepdims=True) == x, 0,
                                          b["loss_mask"])} for b in batches]
  backbone = transformer.backbone_units(setup.dims)
  out = []
  for data, seed in ((batches, 0), (without, 0), (batches, 1)):
    cfg_seed = cfg.copy_and_resolve_references()
    cfg_seed.seed = seed
    setup_seed = engine.build(cfg_seed)
    state = engine.init_state(setup, 0)   # the same initial weights
    state["opt"] = setup_seed.tx.init(state["params"])   # the noise key of `seed`
    step = jax.jit(lambda s, b: trainer.train_step(setup_seed, s, b))
    for b in data:
      state, _ = step(state, b)
    out.append(jax.tree.map(lambda p, m: np.asarray(p) * m, state["params"], backbone))
  distance = lambda a, b: math.sqrt(sum(float(np.sum((u - v) ** 2))
                                        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
  return distance(out[0], out[1]), distance(out[0], out[2])


@pytest.mark.slow
def test_a_neighbour_hides_in_the_noise_more_as_the_noise_grows():
  """How far removing a source moves the backbone, against how far another noise draw
  moves it: the ratio falls as the noise multiplier grows."""
  ratios = []
  for noise in (0.25, 1.0, 4.0):
    neighbour, redraw = _neighbours(noise)
    assert neighbour > 0   # the source did contribute
    ratios.append(neighbour / redraw)
  assert ratios[0] > ratios[1] > ratios[2], ratios
  assert ratios[2] < 0.5 * ratios[0]


def test_participation_is_read_off_the_batch_plan():
  plan = [np.asarray([5, 6, 0]), np.asarray([5, 5, 7]), np.asarray([6, 8, 9])]
  steps, rows = privacy.participation(plan)
  assert steps.tolist() == [1, 2, 2]    # source 5 in steps 0 and 1; 6 in 0 and 2
  assert rows.tolist() == [1, 2, 2]     # source 5 twice in step 1


def test_the_accountant_agrees_with_the_gaussian_mechanism_and_with_pld():
  delta = 1e-5

  def analytic(sigma):   # the exact epsilon of one Gaussian mechanism (Balle & Wang 2018)
    f = lambda eps: (stats.norm.cdf(-eps * sigma + 1 / (2 * sigma))
                     - math.exp(eps) * stats.norm.cdf(-eps * sigma - 1 / (2 * sigma)) - delta)
    return optimize.brentq(f, 1e-6, 100)
  for sigma in (1.0, 2.0, 4.0):
    got = privacy.epsilon(sigma, 1, 1, delta)
    assert analytic(sigma) <= got <= 1.5 * analytic(sigma)   # RDP: a bound, not far above
  # composition, and k rows of a source in one step act as noise / k
  pld = dp_accounting.pld.PLDAccountant().compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(2.0), 50)).get_epsilon(delta)
  assert privacy.epsilon(4.0, 50, 2, delta) == pytest.approx(pld, rel=0.15)
  assert privacy.epsilon(1.0, 0, 1, delta) == 0.0 and privacy.epsilon(0.0, 3, 1, delta) == math.inf


def test_a_private_run_is_refused_where_the_argument_does_not_hold(smoke_cfg):
  for override, field in ((("--config.train.dp.clip=1.0",), "data.max_docs_per_row"),
                          (ONE_A_ROW + ("--config.train.dp.clip=1.0", "--config.train.grad_accum=2"),
                           "train.grad_accum"),
                          (ONE_A_ROW + ("--config.train.dp.clip=1.0", "--config.model.kind=dense"),
                           "train.dp.clip"),
                          (ONE_A_ROW + ("--config.train.dp.clip=1.0", "--config.train.dp.delta=0"),
                           "train.dp.delta")):
    with pytest.raises(ConfigError, match=field):
      engine.build(config.load("experiments/quickstart.py:smoke", override))
