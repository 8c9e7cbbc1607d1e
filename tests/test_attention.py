"""Attention backends against the XLA reference; scanned vs unrolled layers; remat policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sinkformer import engine
from sinkformer.errors import ConfigError
from sinkformer.model import attention, transformer


def packed_rows(length: int):
  """Two rows, GQA (4 query heads on 2 K/V heads): several documents and trailing padding."""
  b, h, hkv, hd = 2, 4, 2, 32
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, length, h, hd))
  k = jax.random.normal(keys[1], (b, length, hkv, hd))
  v = jax.random.normal(keys[2], (b, length, hkv, hd))
  cuts = [(0.3, 0.55, 0.9), (0.5, 0.52, 1.0)]   # row 1: a one-token document, no padding
  seg = np.zeros((b, length), np.int32)
  for r, ends in enumerate(cuts):
    start = 0
    for s, end in enumerate(ends, start=1):
      stop = max(int(end * length), start + 1)
      seg[r, start:stop] = s
      start = stop
  return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("backend", ["pallas", "splash"])
@pytest.mark.parametrize("length", [128, 96])   # 96: padded to the kernels' block inside
def test_backend_equals_xla_forward_and_gradients(backend, length):
  if jax.default_backend() not in ("cpu",) + attention.PLATFORMS[backend]:   # gpu_check.sh
    pytest.skip(f"{backend} runs natively on {attention.PLATFORMS[backend]}, interpreted on cpu")
  q, k, v, seg = packed_rows(length)
  run = lambda name: lambda q, k, v: attention.packed(q, k, v, seg, name)
  np.testing.assert_allclose(run(backend)(q, k, v), run("xla")(q, k, v), atol=2e-5, rtol=2e-5)
  weights = jax.random.normal(jax.random.key(1), q.shape)
  grad = lambda name: jax.grad(lambda *x: (run(name)(*x) * weights).sum(), argnums=(0, 1, 2))
  for got, want in zip(grad(backend)(q, k, v), grad("xla")(q, k, v)):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def test_padding_attends_only_to_padding_and_documents_not_to_each_other():
  q, k, v, seg = packed_rows(64)
  out = attention.packed(q, k, v, seg, "xla")
  # Changing the second document's keys/values must not move the first document's outputs.
  first = seg[0] == 1
  k2 = k.at[0, ~first].add(1.0)
  np.testing.assert_allclose(attention.packed(q, k2, v, seg, "xla")[0, first], out[0, first])
  assert np.isfinite(np.asarray(out)).all()


def test_backends_are_resolved_per_platform_and_refused_where_they_do_not_run():
  assert [attention.resolve("auto", p) for p in ("cpu", "gpu", "tpu")] == ["xla", "pallas", "splash"]
  assert attention.resolve("xla", "tpu") == "xla"
  with pytest.raises(ConfigError, match="model.attention.*'splash' does not run on gpu; use "
                                        "xla or pallas or auto"):
    attention.resolve("splash", "gpu")
  with pytest.raises(ConfigError, match="'pallas' does not run on cpu; use xla or auto"):
    attention.resolve("pallas", "cpu")
  with pytest.raises(ConfigError, match="'cudnn' is not one of auto, xla, pallas, splash"):
    attention.resolve("cudnn", "gpu")


def test_a_config_naming_a_backend_or_policy_this_platform_lacks_fails_before_compiling(smoke_cfg):
  smoke_cfg.model.attention = "splash"
  with pytest.raises(ConfigError, match="model.attention"):
    engine.build(smoke_cfg)
  smoke_cfg.model.attention = "auto"
  smoke_cfg.model.remat = "some"
  with pytest.raises(ConfigError, match="model.remat: 'some' is not one of none, full, dots"):
    engine.build(smoke_cfg)


def loss_and_grads(cfg, dims_change=None, per_layer=False):
  cfg.sinks.per_layer = per_layer
  cfg.model.num_heads, cfg.sinks.attn_heads, cfg.sinks.attn_k = 4, 2, 1
  setup = engine.build(cfg)
  params = engine.init_state(setup, 0)["params"]
  if dims_change:   # same parameters, another way to run them
    import dataclasses
    setup = dataclasses.replace(setup, graphdef=transformer.abstract(
        dataclasses.replace(setup.dims, **dims_change))[0])
  _, k, v, seg = packed_rows(128)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(3, 200, (2, 128)), "targets": rng.integers(3, 200, (2, 128)),
           "loss_mask": np.asarray(seg > 0, np.int32), "segment_ids": np.asarray(seg),
           "source_ids": np.asarray(seg) * 7 + (np.asarray(seg) > 0),
           "positions": np.tile(np.arange(128), (2, 1))}
  loss = lambda p: engine.token_losses(setup, p, batch)[0].sum()
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("change", [{"scan_layers": False}, {"remat": "full"}, {"remat": "dots"},
                                    {"attention": "pallas"}])
@pytest.mark.parametrize("per_layer", [False, True])
def test_unrolled_rematerialised_and_fused_runs_equal_the_plain_scan(smoke_cfg, change, per_layer):
  want_loss, want = loss_and_grads(smoke_cfg.copy_and_resolve_references(), None, per_layer)
  got_loss, got = loss_and_grads(smoke_cfg, change, per_layer)
  assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
