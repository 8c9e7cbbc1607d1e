"""Attention backends against the XLA reference; scanned vs unrolled layers; remat policies.

On a CPU the Pallas kernels run interpreted, in float32: they must match XLA to ~1e-5. On a
GPU (the GPU script runs this file) matmuls use TF32 or bf16, so the tolerances widen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sinkformer import engine
from sinkformer.errors import ConfigError
from sinkformer.model import attention, flash, transformer


TOL = {"cpu": (2e-5, 5e-5)}.get(jax.default_backend(), (2e-2, 2e-2))   # (forward, gradients)


def packed_rows(length: int, h: int = 4, hkv: int = 2, hd: int = 32):
  """Two rows, GQA (4 query heads on 2 K/V heads): several documents and trailing padding."""
  b = 2
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


@pytest.mark.parametrize("backend,length,heads", [
    ("pallas", 128, (4, 2, 32)), ("pallas", 96, (4, 2, 32)),   # 96: padded to the block inside
    ("pallas", 256, (6, 2, 64)), ("pallas", 200, (3, 3, 32)),  # 3 groups; no groups, odd length
    ("splash", 128, (4, 2, 32)), ("splash", 96, (4, 2, 32)),
    ("cudnn", 128, (4, 2, 32)), ("cudnn", 200, (3, 3, 32))])   # on a GPU only (bench/gpu/check.py)
def test_backend_equals_xla_forward_and_gradients(backend, length, heads):
  if jax.default_backend() not in ("cpu",) + attention.PLATFORMS[backend]:   # bench/gpu/check.py
    pytest.skip(f"{backend} runs natively on {attention.PLATFORMS[backend]}, interpreted on cpu")
  if backend == "cudnn":   # no interpreter: checked where it runs, if it may run there
    if jax.default_backend() != "gpu":
      pytest.skip("cudnn runs on a GPU only")
    try:
      attention.resolve("cudnn", "gpu")
    except ConfigError as e:
      pytest.skip(str(e))
  q, k, v, seg = packed_rows(length, *heads)
  run = lambda name: lambda q, k, v: attention.packed(q, k, v, seg, name)
  fwd, bwd = TOL
  np.testing.assert_allclose(run(backend)(q, k, v), run("xla")(q, k, v), atol=fwd, rtol=fwd)
  weights = jax.random.normal(jax.random.key(1), q.shape)
  grad = lambda name: jax.grad(lambda *x: (run(name)(*x) * weights).sum(), argnums=(0, 1, 2))
  for got, want in zip(grad(backend)(q, k, v), grad("xla")(q, k, v)):
    np.testing.assert_allclose(got, want, atol=bwd, rtol=bwd)


def test_the_kernel_visits_only_blocks_that_share_a_document():
  """Row 0: documents [0, 300), [300, 512); row 1: [0, 100), then padding. Blocks of 128."""
  seg = np.zeros((2, 512), np.int32)
  seg[0, :300], seg[0, 300:] = 1, 2
  seg[1, :100] = 1
  kv_from, q_to = flash.block_ranges(jnp.asarray(seg), 128, 128)
  # query block 2 (256..383) holds tokens of document 1 (from 0) and 2 (from 300): from block 0;
  # block 3 (384..511) only document 2: from block 300 // 128 = 2
  assert kv_from.tolist() == [[0, 0, 0, 2], [0, 0, 0, 0]]
  # K/V block 0 of row 1 ends with padding that runs to 511: every query block after it
  assert q_to.tolist() == [[3, 3, 4, 4], [4, 4, 4, 4]]
  # 32 documents of 32 tokens in a 1024 row, blocks of 64: ~1/16 of the causal blocks
  many = jnp.repeat(jnp.arange(1, 33, dtype=jnp.int32), 32)[None]
  assert flash.visited(many, 64, 64) == pytest.approx(16 / 136)
  assert flash.visited(jnp.ones((1, 1024), jnp.int32), 64, 64) == 1.0
  blocks = flash.block_sizes(128, 1024)
  assert blocks.fwd == (128, 64) and blocks.warps == 8
  assert flash.block_sizes(32, 64).fwd == (64, 64)   # never longer than the row


def test_cudnn_gets_each_documents_length_and_offset():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0] * 8], jnp.int32)
  lengths, offsets = attention.cudnn_segments(seg)
  assert lengths.shape == (3, 8) and offsets.shape == (3, 9)
  assert lengths[0].tolist() == [3, 2, 1] + [-1] * 5
  assert offsets[0].tolist() == [0, 3, 5] + [-1] * 6
  assert lengths[1].tolist() == [8] + [-1] * 7 and offsets[1].tolist() == [0] + [-1] * 8
  assert (lengths[2] == -1).all() and (offsets[2] == -1).all()


def test_cudnn_is_refused_where_it_cannot_be_trusted():
  with pytest.raises(ConfigError, match="cudnn' does not run on cpu"):
    attention.resolve("cudnn", "cpu")
  with pytest.raises(ConfigError, match="jax >= 0.11.2|compute capability 9.0"):
    attention.resolve("cudnn", "gpu")   # jax 0.10 here, and no Hopper GPU


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
                                        "xla or pallas or cudnn or auto"):
    attention.resolve("splash", "gpu")
  with pytest.raises(ConfigError, match="'pallas' does not run on cpu; use xla or auto"):
    attention.resolve("pallas", "cpu")
  with pytest.raises(ConfigError, match="'flash' is not one of auto, xla, pallas, cudnn, splash"):
    attention.resolve("flash", "gpu")


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
