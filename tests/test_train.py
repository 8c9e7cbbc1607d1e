"""The train step and loop: learning, accumulation, per-source stats, what a run writes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sinkformer import engine
from sinkformer.data import pipeline
from sinkformer.model import flops
from sinkformer.train import trainer


def first_batch(setup, cfg, step=0):
  return engine.put_batch(setup, pipeline.load(cfg).train.batch(step))


def test_a_few_steps_lower_the_loss(smoke_cfg):
  smoke_cfg.train.steps = 12
  setup = engine.build(smoke_cfg)
  state = engine.init_state(setup, 0)
  step = trainer.compile_train_step(setup, state, first_batch(setup, smoke_cfg))
  losses = []
  for i in range(12):
    state, metrics = step(state, first_batch(setup, smoke_cfg, i))
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  assert int(state["step"]) == 12


def test_gradient_accumulation_matches_one_big_batch(smoke_cfg):
  results = []
  for accum in (1, 4):
    smoke_cfg.train.grad_accum = accum
    setup = engine.build(smoke_cfg)
    state = engine.init_state(setup, 0)
    step = trainer.compile_train_step(setup, state, first_batch(setup, smoke_cfg))
    state, metrics = step(state, first_batch(setup, smoke_cfg))
    results.append((jax.device_get(state["params"]), float(metrics["loss"])))
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               results[0][0], results[1][0])


def test_per_source_loss_from_inside_the_step(smoke_cfg):
  setup = engine.build(smoke_cfg)
  state = engine.init_state(setup, 0)
  batch = first_batch(setup, smoke_cfg)
  nll, mask = jax.device_get(engine.token_losses(setup, state["params"], batch))
  step = trainer.compile_train_step(setup, state, batch)
  _, metrics = step(state, batch)
  docs = jax.device_get(metrics["docs"])
  # Sized by the batch (rows x document slots), never by the number of sources.
  assert docs["source"].shape == (smoke_cfg.train.batch_size, smoke_cfg.data.max_docs_per_row + 1)
  ids, loss, tokens = trainer._aggregate_sources([docs])
  src = np.asarray(batch["source_ids"])
  for sid, l, n in zip(ids, loss, tokens):
    sel = (src == sid) & (mask > 0)
    assert n == sel.sum()
    assert l == pytest.approx(nll[sel].mean(), rel=1e-5)
  assert set(ids) == set(np.unique(src[mask > 0]))


def test_bf16_compute_keeps_float32_params(smoke_cfg):
  smoke_cfg.model.dtype = "bfloat16"
  setup = engine.build(smoke_cfg)
  state = engine.init_state(setup, 0)
  step = trainer.compile_train_step(setup, state, first_batch(setup, smoke_cfg))
  state, metrics = step(state, first_batch(setup, smoke_cfg))
  assert np.isfinite(float(metrics["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_training_sources_score_better_with_their_own_sinks(smoke_cfg, tmp_path):
  smoke_cfg.train.update(steps=120, warmup_steps=10, log_every=40, eval_every=0)
  smoke_cfg.data.num_sources = 48
  state, _ = trainer.train(smoke_cfg, str(tmp_path))
  setup = engine.build(smoke_cfg)
  seen = pipeline.load(smoke_cfg).seen
  batch = {k: jnp.asarray(v) for k, v in seen.rows(np.arange(seen.epoch_rows(0))).items()}
  loss = {}
  for mode in ("train", "backbone"):
    nll, mask = engine.token_losses(setup, state["params"], batch, mode)
    loss[mode] = float(nll.sum() / mask.sum())
  assert loss["train"] < loss["backbone"] - 0.5, loss


def test_run_writes_metrics_tensorboard_and_per_source_logs(smoke_cfg, tmp_path):
  _, history = trainer.train(smoke_cfg, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_rows = [l for l in lines if l["split"] == "train"]
  assert [l["step"] for l in train_rows] == [3, 6]
  for key in ("loss", "tokens_per_s", "mfu", "data_frac", "grad_norm", "lr"):
    assert all(np.isfinite(l[key]) for l in train_rows), key
  val = [l for l in lines if l["split"] == "val"]
  assert val and {"seen_loss", "seen_backbone_loss", "unseen_loss", "unseen_backbone_loss"} <= set(val[0])
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  per_source = [json.loads(l) for l in (tmp_path / "sources.jsonl").read_text().splitlines()]
  assert len(per_source) == 2 and len(per_source[0]["source_id"]) == len(per_source[0]["loss"])
  assert json.loads((tmp_path / "config.json").read_text())["model"]["kind"] == "null"


def test_flops_formula_agrees_with_xla(smoke_cfg):
  """6N + 6LsD (causal-halved attention) vs XLA's count of the compiled train step (unrolled:
  XLA's cost analysis counts a scanned loop's body once)."""
  smoke_cfg.model.scan_layers = False
  setup = engine.build(smoke_cfg)
  state = engine.init_state(setup, 0)
  step = trainer.compile_train_step(setup, state, first_batch(setup, smoke_cfg))
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  tokens = smoke_cfg.train.batch_size * smoke_cfg.data.seq_len
  m = setup.dims
  # XLA computes the full (unmasked) attention score matrix: add back the causal half.
  full_attention = 6.0 * m.num_layers * smoke_cfg.data.seq_len * m.num_heads * m.head_dim
  formula = flops.flops_per_token(setup.dims, smoke_cfg.data.seq_len) + full_attention
  assert cost["flops"] / tokens == pytest.approx(formula, rel=0.15)


def test_backbone_rates_apply_to_everything_but_the_sinks(smoke_cfg):
  """backbone_lr_scale = 0 and no decay freeze every parameter outside the sink units
  (embeddings, attention, norms, backbone MLP units) while the sinks and sink heads learn;
  the same config with the plain optimizer moves both."""
  smoke_cfg.sinks.update(attn_heads=1, attn_k=1)
  smoke_cfg.train.update(lr=1e-2, warmup_steps=0, backbone_lr_scale=0.0, backbone_decay_scale=0.0)
  g, d = smoke_cfg.model.mlp_backbone, smoke_cfg.model.head_dim
  moved = {}
  for frozen in (True, False):
    if not frozen:
      smoke_cfg.train.update(backbone_lr_scale=1.0, backbone_decay_scale=1.0)
    setup = engine.build(smoke_cfg)
    state = engine.init_state(setup, 0)
    before = jax.tree.map(np.asarray, state["params"])
    step = trainer.compile_train_step(setup, state, first_batch(setup, smoke_cfg))
    for i in range(2):
      state, _ = step(state, first_batch(setup, smoke_cfg, i))
    after = jax.tree.map(np.asarray, state["params"])
    change = jax.tree.map(lambda a, b: np.abs(a - b), after, before)
    mlp, attn = change["blocks"]["mlp"], change["blocks"]["attn"]
    moved[frozen] = {
        "embed": change["embed"]["embedding"].max(), "kv": attn["k"]["kernel"].max(),
        "norm": change["blocks"]["attn_norm"]["scale"].max(),
        "backbone units": max(mlp["gate"]["kernel"][..., :g].max(), mlp["down"]["kernel"][:, :g].max()),
        "backbone heads": attn["q"]["kernel"][..., :-d].max(),
        "sink units": mlp["gate"]["kernel"][..., g:].max(), "sink heads": attn["o"]["kernel"][:, -d:].max()}
  assert all(v == 0 for k, v in moved[True].items() if k.startswith(("embed", "kv", "norm", "backbone")))
  assert moved[True]["sink units"] > 1e-3 and moved[True]["sink heads"] > 1e-3
  assert all(v > 1e-3 for v in moved[False].values()), moved[False]
