"""The decoder with sinks: gradient isolation, packing isolation, modes, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sinkformer import config, engine
from sinkformer.model import sinks, transformer

T = 32


def setup_and_params(cfg):
  setup = engine.build(cfg)
  return setup, transformer.init(setup.dims, 0)


def row(docs, seq_len=T):
  """One packed row from [(source_id, tokens), ...] (tokens as lists), padding after."""
  b = {k: np.zeros((1, seq_len), np.int32) for k in
       ("tokens", "targets", "loss_mask", "source_ids", "segment_ids", "positions")}
  at = 0
  for segment, (source, tokens) in enumerate(docs, start=1):
    n = len(tokens)
    b["tokens"][0, at:at + n] = tokens
    b["targets"][0, at:at + n - 1] = tokens[1:]
    b["loss_mask"][0, at:at + n - 1] = 1
    b["source_ids"][0, at:at + n] = source
    b["segment_ids"][0, at:at + n] = segment
    b["positions"][0, at:at + n] = np.arange(n)
    at += n
  return {k: jnp.asarray(v) for k, v in b.items()}


def grads_for(setup, params, batch, mode="train", **kw):
  loss = lambda p: engine.token_losses(setup, p, batch, mode, **kw)[0].sum()
  return jax.grad(loss)(params)


def layer_of(tree, layer):
  """One layer's block parameters out of the stacked [L, ...] blocks."""
  return jax.tree.map(lambda a: a[layer], tree["blocks"])


def sink_unit_grads(grads, layer, G):
  """|grad| summed per sink unit over gate/up columns and down rows, each separately."""
  mlp = layer_of(grads, layer)["mlp"]
  return {"gate": np.abs(mlp["gate"]["kernel"][:, G:]).sum(0),
          "up": np.abs(mlp["up"]["kernel"][:, G:]).sum(0),
          "down": np.abs(mlp["down"]["kernel"][G:, :]).sum(1)}


@pytest.mark.parametrize("per_layer", [False, True])
def test_gradient_isolation(smoke_cfg, per_layer):
  smoke_cfg.sinks.per_layer = per_layer
  setup, params = setup_and_params(smoke_cfg)
  rng = np.random.default_rng(0)
  source = 12345
  grads = grads_for(setup, params, row([(source, rng.integers(3, 200, 20).tolist())]))
  for layer in range(smoke_cfg.model.num_layers):
    on = np.asarray(sinks.sink_mask(setup.spec, jnp.array(source), layer))
    for name, g in sink_unit_grads(grads, layer, smoke_cfg.model.mlp_backbone).items():
      assert (g[~on] == 0).all(), f"layer {layer} {name}: inactive sinks got gradient"
      assert (g[on] > 0).all(), f"layer {layer} {name}: active sinks got no gradient"


def test_gradient_isolation_in_a_packed_row(smoke_cfg):
  setup, params = setup_and_params(smoke_cfg)
  grads = grads_for(setup, params, row([(7, list(range(3, 15))), (8, list(range(20, 31)))]))
  on = np.asarray(sinks.sink_mask(setup.spec, jnp.array([7, 8]))).any(0)
  g = sink_unit_grads(grads, 0, smoke_cfg.model.mlp_backbone)
  assert all((v[~on] == 0).all() and (v[on] > 0).all() for v in g.values())


def test_attention_sink_heads_get_gradient_only_from_their_sources(smoke_cfg):
  smoke_cfg.model.num_heads, smoke_cfg.model.num_kv_heads = 4, 2
  smoke_cfg.sinks.attn_heads, smoke_cfg.sinks.attn_k = 2, 1
  setup, params = setup_and_params(smoke_cfg)
  grads = grads_for(setup, params, row([(77, list(range(3, 25)))]))
  on = np.asarray(sinks.make_gate(setup.spec, "source", segment_ids=jnp.ones((1, 1), jnp.int32),
                                  row_sources=[77]).attn[0, 0, 0])
  hd = smoke_cfg.model.head_dim
  attn = layer_of(grads, 0)["attn"]
  o = np.abs(attn["o"]["kernel"]).reshape(4, hd, -1).sum((1, 2))
  q = np.abs(attn["q"]["kernel"]).reshape(-1, 4, hd).sum((0, 2))
  for g in (o, q):
    assert (g[:2] > 0).all()                          # backbone heads
    assert (g[2:][on] > 0).all() and (g[2:][~on] == 0).all()


@pytest.mark.parametrize("kind", ["null", "dense"])
def test_packing_isolation(smoke_cfg, kind):
  smoke_cfg.model.kind = kind
  setup, params = setup_and_params(smoke_cfg)
  a, b = (5, list(range(3, 16))), (6, list(range(40, 57)))
  alone, packed = row([a]), row([b, a])
  fwd = jax.jit(lambda batch, mode: transformer.apply(setup.graphdef, params, batch, None if
                setup.spec is None else sinks.make_gate(setup.spec, mode,
                segment_ids=batch["segment_ids"], source_ids=batch["source_ids"],
                max_docs=setup.max_docs)), static_argnums=1)
  n, off = len(a[1]), len(b[1])
  np.testing.assert_allclose(fwd(alone, "train")[0, :n], fwd(packed, "train")[0, off:off + n],
                             rtol=1e-5, atol=1e-5)


def perturb_sinks(params, G, units):
  """Replace the weights of the given sink units (bool[P]) by noise, in every layer."""
  rng = np.random.default_rng(1)
  cols = np.flatnonzero(units) + G
  new = jax.tree.map(lambda x: x, params)
  mlp = new["blocks"]["mlp"]                  # kernels stacked over layers: [L, in, out]
  for name in ("gate", "up"):
    k = np.array(mlp[name]["kernel"])
    k[:, :, cols] = rng.normal(size=k[:, :, cols].shape)
    mlp[name]["kernel"] = jnp.asarray(k)
  k = np.array(mlp["down"]["kernel"])
  k[:, cols, :] = rng.normal(size=k[:, cols, :].shape)
  mlp["down"]["kernel"] = jnp.asarray(k)
  return new


def test_backbone_mode_uses_no_sink(smoke_cfg):
  setup, params = setup_and_params(smoke_cfg)
  batch = row([(3, list(range(3, 20)))])
  every_sink = np.ones(smoke_cfg.sinks.num, bool)
  out = lambda p, mode: engine.token_losses(setup, p, batch, mode)[0]
  noisy = perturb_sinks(params, smoke_cfg.model.mlp_backbone, every_sink)
  np.testing.assert_array_equal(out(params, "backbone"), out(noisy, "backbone"))
  assert not np.allclose(out(params, "train"), out(noisy, "train"))   # the noise does matter


def test_mlp_off_mode_equals_a_model_without_mlps(smoke_cfg):
  setup, params = setup_and_params(smoke_cfg)
  batch = row([(3, list(range(3, 20)))])
  no_mlp = jax.tree.map(lambda x: x, params)
  no_mlp["blocks"]["mlp"]["down"]["kernel"] = jnp.zeros_like(params["blocks"]["mlp"]["down"]["kernel"])
  out = lambda p, mode: engine.token_losses(setup, p, batch, mode)[0]
  np.testing.assert_allclose(out(params, "mlp-off"), out(no_mlp, "train"), rtol=1e-6, atol=1e-6)
  assert not np.allclose(out(params, "mlp-off"), out(params, "backbone"))


def test_backbone_rescale_scales_the_mlp_output(smoke_cfg):
  smoke_cfg.sinks.backbone_rescale = True
  setup, params = setup_and_params(smoke_cfg)
  blocks = transformer.nnx.merge(setup.graphdef, params).blocks
  graphdef, stacked = transformer.nnx.split(blocks)
  mlp = transformer.nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked)).mlp
  x = jax.random.normal(jax.random.key(0), (1, 4, smoke_cfg.model.d_model))
  gate = sinks.make_gate(setup.spec, "backbone", segment_ids=jnp.ones((1, 4), jnp.int32))
  units = sinks.mlp_units(gate, 0, smoke_cfg.model.mlp_backbone)
  G, k = smoke_cfg.model.mlp_backbone, smoke_cfg.sinks.k
  assert gate.backbone_scale == pytest.approx((G + k) / G)
  np.testing.assert_allclose(mlp(x, units, gate.backbone_scale), (G + k) / G * mlp(x, units),
                             rtol=1e-5, atol=1e-7)


def test_excluded_units_have_no_effect_whatever_source_is_on(smoke_cfg):
  setup, params = setup_and_params(smoke_cfg)
  forgotten = [21, 22]
  excl = sinks.exclusion(setup.spec, forgotten)
  noisy = perturb_sinks(params, smoke_cfg.model.mlp_backbone, np.asarray(excl.mlp[0]))
  batch = row([(21, list(range(3, 20)))])
  for asked in (21, 22, 30):   # the forgotten sources themselves, and a retained one
    batch["row_sources"] = jnp.array([asked])
    out = lambda p: engine.token_losses(setup, p, batch, "source", exclude=excl)[0]
    np.testing.assert_array_equal(out(params), out(noisy))


def test_dense_control_has_the_same_parameter_count(smoke_cfg):
  counts = {}
  for kind in ("null", "dense"):
    smoke_cfg.model.kind = kind
    counts[kind] = transformer.count_params(transformer.abstract(transformer.Dims.from_config(smoke_cfg))[1])
  assert counts["null"] == counts["dense"]
  assert engine.build(smoke_cfg).spec is None     # the dense control has no gate at all


def test_tied_embeddings_drop_the_lm_head(smoke_cfg):
  untied = transformer.count_params(transformer.abstract(transformer.Dims.from_config(smoke_cfg))[1])
  smoke_cfg.model.tie_embeddings = True
  setup, params = setup_and_params(smoke_cfg)
  assert "lm_head" not in params
  m = smoke_cfg.model
  assert transformer.count_params(params) == untied - m.vocab_size * m.d_model
  assert np.isfinite(engine.token_losses(setup, params, row([(1, [3, 4, 5])]))[0]).all()


def test_wiki_1b_builds_abstractly_with_about_a_billion_parameters():
  cfg = config.load("experiments/wiki_1b.py")
  graphdef, params, axes = transformer.abstract(transformer.Dims.from_config(cfg))
  leaves = jax.tree.leaves(params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)   # nothing allocated
  n = transformer.count_params(params)
  assert 1.0e9 <= n <= 1.2e9, n
  assert params["blocks"]["mlp"]["gate"]["kernel"].shape == (32, 960, 8192)
  assert params["blocks"]["attn"]["k"]["kernel"].shape == (32, 960, 5 * 128)
  assert axes["blocks"]["mlp"]["down"]["kernel"] == ("layers", "mlp", "embed")


def test_rope_positions_restart_per_document():
  x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  a = transformer.rope(x, jnp.array([[0, 1, 2, 3]]), 1e4)
  b = transformer.rope(x, jnp.array([[0, 1, 0, 1]]), 1e4)
  np.testing.assert_allclose(a[:, :2], b[:, :2])
  np.testing.assert_allclose(a[:, :1], x[:, :1], rtol=1e-6)    # position 0 is the identity
  assert not np.allclose(a[:, 2:], b[:, 2:])


def test_changing_sources_or_exclusions_does_not_recompile(smoke_cfg):
  setup, params = setup_and_params(smoke_cfg)
  batch = row([(1, list(range(3, 20)))])

  @jax.jit
  def loss(params, batch, exclude):
    return engine.token_losses(setup, params, batch, "source", exclude=exclude)[0].sum()

  for asked, forgotten in ((1, [2]), (2, [1]), (2**31 - 1, [5]), (9, [1])):
    batch["row_sources"] = jnp.array([asked])
    loss(params, batch, sinks.exclusion(setup.spec, forgotten))
  assert loss._cache_size() == 1
