"""The sink mask: exactly k, deterministic everywhere, table-free, id 0 = no sinks."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from sinkformer.model import sinks

SPEC = sinks.SinkSpec(backbone=32, mlp=sinks.Pool(416, 16), attn=None, num_layers=3,
                      per_layer=False, exact=True, seed=0, backbone_rescale=False)
BIG_IDS = [1, 2, 7, 123_456, 2**31 - 1]

MASK_SCRIPT = """
import json, sys, jax.numpy as jnp
from sinkformer.model import sinks
spec = sinks.SinkSpec(backbone=32, mlp=sinks.Pool(416, 16), attn=None, num_layers=3,
                      per_layer=False, exact=True, seed=0, backbone_rescale=False)
m = sinks.sink_mask(spec, jnp.array(json.loads(sys.argv[1])))
print(json.dumps([list(map(int, jnp.flatnonzero(row))) for row in m]))
"""


def on_units(mask):
  return [list(map(int, np.flatnonzero(row))) for row in np.asarray(mask)]


def test_exactly_k_on_for_every_id_including_int32_max():
  m = sinks.sink_mask(SPEC, jnp.array(BIG_IDS))
  assert m.shape == (len(BIG_IDS), 416)
  assert (m.sum(-1) == 16).all()
  assert len({tuple(u) for u in on_units(m)}) == len(BIG_IDS)   # different ids, different masks


def test_id_zero_means_no_sinks():
  assert not sinks.sink_mask(SPEC, jnp.zeros((3,), jnp.int32)).any()
  bern = SPEC.__class__(**{**SPEC.__dict__, "exact": False})
  assert not sinks.sink_mask(bern, jnp.zeros((3,), jnp.int32)).any()


def test_same_mask_in_another_process():
  here = on_units(sinks.sink_mask(SPEC, jnp.array(BIG_IDS)))
  out = subprocess.run([sys.executable, "-c", MASK_SCRIPT, json.dumps(BIG_IDS)], check=True,
                       capture_output=True, text=True).stdout
  assert json.loads(out) == here


def test_mask_is_pinned_across_runs_and_versions():
  # If this changes, every existing checkpoint's sources silently get other sinks: the
  # derivation (threefry fold_in of seed, pool, layer, id, unit) must never change.
  assert on_units(sinks.sink_mask(SPEC, jnp.array([1])))[0] == GOLDEN_SOURCE_1


def test_mean_overlap_is_k_squared_over_p():
  ids = np.random.default_rng(0).integers(1, 2**31 - 1, size=(2000, 2))
  m = np.asarray(sinks.sink_mask(SPEC, jnp.asarray(ids, jnp.int32)))
  overlap = (m[:, 0] & m[:, 1]).sum(-1).mean()
  assert overlap == pytest.approx(16**2 / 416, abs=0.1)


def test_bernoulli_selection_has_mean_k():
  bern = SPEC.__class__(**{**SPEC.__dict__, "exact": False})
  counts = np.asarray(sinks.sink_mask(bern, jnp.arange(1, 2001)).sum(-1))
  assert counts.mean() == pytest.approx(16, abs=0.5)
  assert counts.std() > 1      # a fixed count would mean Bernoulli is not being used


def test_per_layer_masks_differ_between_layers_shared_ones_do_not():
  per = SPEC.__class__(**{**SPEC.__dict__, "per_layer": True})
  a, b = sinks.sink_mask(per, jnp.array([5]), 0), sinks.sink_mask(per, jnp.array([5]), 1)
  assert not (a == b).all()
  assert (sinks.sink_mask(SPEC, jnp.array([5]), 0) == sinks.sink_mask(SPEC, jnp.array([5]), 2)).all()


def test_train_gate_uses_each_documents_own_mask():
  # Row 0 packs sources 3 (segment 1) and 9 (segment 2) then padding; row 1 holds source 4.
  src = jnp.array([[3, 3, 9, 9, 9, 0], [4, 4, 4, 4, 4, 4]])
  seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  gate = sinks.make_gate(SPEC, "train", segment_ids=seg, source_ids=src, max_docs=4)
  units = np.asarray(sinks.mlp_units(gate, 0, SPEC.backbone))
  assert units[..., :32].all()
  expect = lambda s: np.asarray(sinks.sink_mask(SPEC, jnp.array(s)))
  for b, t in np.ndindex(2, 6):
    np.testing.assert_array_equal(units[b, t, 32:], expect(int(src[b, t])))


def test_exclusion_zeroes_exactly_the_excluded_units_in_source_mode():
  excl = sinks.exclusion(SPEC, [11, 12])
  union = np.asarray(sinks.sink_mask(SPEC, jnp.array([11, 12]))).any(0)
  np.testing.assert_array_equal(np.asarray(excl.mlp[0]), union)
  seg = jnp.ones((3, 4), jnp.int32)
  gate = sinks.make_gate(SPEC, "source", segment_ids=seg, row_sources=[11, 13, 0], exclude=excl)
  units = np.asarray(sinks.mlp_units(gate, 0, SPEC.backbone))
  for b, s in enumerate([11, 13, 0]):
    want = np.asarray(sinks.sink_mask(SPEC, jnp.array(s))) & ~union
    np.testing.assert_array_equal(units[b, :, 32:], np.broadcast_to(want, (4, 416)))
  assert not units[0, :, 32:].any()     # an excluded source itself gets nothing back
  assert units[..., :32].all()          # the backbone is never excluded


def test_empty_exclusion_excludes_nothing():
  assert not sinks.exclusion(SPEC, []).mlp.any()


def test_backbone_mode_turns_off_every_sink_and_can_rescale():
  seg = jnp.ones((2, 5), jnp.int32)
  for rescale, scale in ((False, None), (True, (32 + 16) / 32)):
    spec = SPEC.__class__(**{**SPEC.__dict__, "backbone_rescale": rescale})
    gate = sinks.make_gate(spec, "backbone", segment_ids=seg)
    units = np.asarray(sinks.mlp_units(gate, 0, 32))
    assert units[..., :32].all() and not units[..., 32:].any()
    assert gate.backbone_scale == (None if scale is None else pytest.approx(scale))


def test_attention_pool_is_independent_of_the_mlp_pool():
  spec = SPEC.__class__(**{**SPEC.__dict__, "attn": sinks.Pool(4, 2)})
  seg = jnp.ones((1, 3), jnp.int32)
  gate = sinks.make_gate(spec, "source", segment_ids=seg, row_sources=[6])
  heads = np.asarray(sinks.head_units(gate, 0, 8))
  assert heads.shape == (1, 3, 8)
  assert heads[..., :4].all() and (heads[..., 4:].sum(-1) == 2).all()


def test_unknown_mode_or_missing_ids_are_rejected():
  seg = jnp.ones((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="unknown sink mode"):
    sinks.make_gate(SPEC, "sinkoff", segment_ids=seg)
  with pytest.raises(ValueError, match="needs row_sources"):
    sinks.make_gate(SPEC, "source", segment_ids=seg)
  with pytest.raises(ValueError, match="needs source_ids"):
    sinks.make_gate(SPEC, "train", segment_ids=seg)


GOLDEN_SOURCE_1 = [24, 49, 62, 79, 81, 105, 127, 186, 233, 235, 236, 257, 277, 288, 344, 362]
