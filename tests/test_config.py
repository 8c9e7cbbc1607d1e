"""Every experiment config loads and validates; configs that cannot work name the field."""

import pathlib

import pytest

from sinkformer import config
from sinkformer.errors import ConfigError, UserError

EXPERIMENTS = sorted(pathlib.Path("experiments").glob("*.py"))
# Presets that pick a mesh are validated against the device count they were written for.
PRESET_DEVICES = {"h100x8": 8, "h100x8x4": 32, "v5p_128": 64, "v5p_128x2": 128}


def all_presets():
  for path in EXPERIMENTS:
    module = {}
    exec(path.read_text(), module)
    yield str(path), None
    for name in module["PRESETS"]:
      yield str(path), name


@pytest.mark.parametrize("path,preset", list(all_presets()))
def test_every_config_and_preset_validates(path, preset):
  cfg = config.load(f"{path}:{preset}" if preset else path)
  assert cfg.model.kind in ("null", "dense")
  config.validate(cfg, PRESET_DEVICES.get(preset, 1))


def test_presets_combine_and_overrides_apply():
  cfg = config.load("experiments/quickstart.py:dense,smoke", ("--config.train.steps=3",))
  assert cfg.model.kind == "dense" and cfg.model.d_model == 64 and cfg.train.steps == 3


@pytest.mark.parametrize("overrides,msg", [
    (("--config.model.d_modle=3",), "d_model"),
    (("--config.nosuch.field=1",), "nosuch"),
    (("--config.train.steps=many",), "steps"),
])
def test_typos_and_bad_values_are_rejected(overrides, msg):
  with pytest.raises(UserError, match=msg):
    config.load("experiments/quickstart.py", overrides)


def test_unknown_preset_lists_the_known_ones():
  with pytest.raises(UserError, match="unknown preset 'fast'; available: dense, smoke"):
    config.load("experiments/quickstart.py:fast")


@pytest.mark.parametrize("changes,devices,field", [
    ({"sinks.k": 500}, 1, "sinks.k"),
    ({"sinks.k": 0}, 1, "sinks.k"),
    ({"model.num_kv_heads": 3}, 1, "model.num_heads"),
    ({"model.head_dim": 31}, 1, "model.head_dim"),
    ({"mesh.data": 4}, 1, "mesh"),
    ({"mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": -1}, 8, "mesh"),
    ({"mesh.tensor": 3, "mesh.data": 1}, 3, "model.num_heads"),
    ({"train.grad_accum": 3}, 1, "train.grad_accum"),
    ({"train.batch_size": 12}, 8, "train.batch_size"),
    ({"model.kind": "sparse"}, 1, "model.kind"),
    ({"sinks.selection": "topk"}, 1, "sinks.selection"),
    ({"sinks.attn_heads": 2, "sinks.attn_k": 3}, 1, "sinks.attn_k"),
    ({"train.warmup_steps": 10**6}, 1, "train.warmup_steps"),
    ({"train.checkpoint_every": 0}, 1, "train.checkpoint_every"),
    ({"eval.relearn.mask": "weights"}, 1, "eval.relearn.mask"),
    ({"eval.gcg.lengths": (8, 4)}, 1, "eval.gcg.lengths"),
    ({"eval.gcg.steps": 0}, 1, "eval.gcg.steps"),
])
def test_configs_that_cannot_work_fail_naming_the_field(changes, devices, field):
  cfg = config.load("experiments/quickstart.py")
  for key, value in changes.items():
    *sections, name = key.split(".")
    parent = cfg
    for section in sections:
      parent = parent[section]
    parent[name] = value
  with pytest.raises(ConfigError) as e:
    config.validate(cfg, devices)
  assert e.value.field == field and str(e.value).startswith(f"config.{field}:")


def test_mesh_infers_one_axis():
  cfg = config.load("experiments/quickstart.py")
  cfg.mesh.update(data=-1, fsdp=2, tensor=2)
  assert config.mesh_shape(cfg.mesh, 8) == (2, 2, 2)


def test_a_hybrid_mesh_repeats_the_slice_mesh_across_slices():
  cfg = config.load("experiments/quickstart.py")
  cfg.mesh.update(data=-1, fsdp=2, tensor=1, dcn_data=4)       # 4 hosts of 8: fsdp within
  assert config.mesh_shape(cfg.mesh, 32) == (16, 2, 1)
  cfg.mesh.update(data=1, fsdp=-1, dcn_data=2, dcn_fsdp=2)
  assert config.mesh_shape(cfg.mesh, 32) == (2, 16, 1)
  cfg.mesh.update(dcn_data=3, dcn_fsdp=1)
  with pytest.raises(ConfigError, match="3 slices/processes do not divide the 32"):
    config.mesh_shape(cfg.mesh, 32)
  cfg.mesh.update(data=4, fsdp=8, dcn_data=2)
  with pytest.raises(ConfigError, match="needs 32 devices per slice but 16 are available"):
    config.mesh_shape(cfg.mesh, 32)


@pytest.mark.parametrize("preset", ["h100x8", "h100x8x4", "v5p_128", "v5p_128x2"])
def test_every_1b_preset_fits_its_hardware(preset):
  cfg = config.load(f"experiments/wiki_1b.py:{preset}")
  devices = PRESET_DEVICES[preset]
  shape = dict(zip(config.MESH_AXES, config.validate(cfg, devices)))
  assert shape["fsdp"] == cfg.mesh.fsdp and shape["data"] == cfg.mesh.dcn_data   # FSDP in a slice
  assert cfg.train.batch_size // cfg.train.grad_accum // devices == 4             # rows/device


def test_eval_overrides_are_typed_like_the_field(tmp_path):
  from sinkformer.eval import context
  (tmp_path / "config.json").write_text("{}")   # a run from before the eval section: defaults
  e = context.settings(str(tmp_path), ["gcg.lengths=(2, 4)", "relearn.lrs=(1e-4,)",
                                        "relearn.steps=3"])
  assert (list(e.gcg.lengths), list(e.relearn.lrs), e.relearn.steps) == ([2, 4], [1e-4], 3)
  # a run's config.json holds tuples as JSON lists: they take overrides all the same
  (tmp_path / "config.json").write_text('{"eval": {"gcg": {"lengths": [2, 4, 8]}}}')
  assert list(context.settings(str(tmp_path), ["gcg.lengths=(3,)"]).gcg.lengths) == [3]
  assert list(context.settings(str(tmp_path), ["gcg.lengths=8"]).gcg.lengths) == [8]
  for bad, msg in (("relearn.steps=2.5", "relearn.steps=2.5: invalid literal for int"),
                   ("gcg.stepz=3", "unknown config field 'gcg.stepz'; nearest: gcg.steps"),
                   ("gcg", "expected \\[SECTION.\\]FIELD=VALUE"),
                   ("stepz=3", "unknown config field 'stepz'; sections: capability, gcg, relearn"),
                   ("relearn.mask=weights", "eval.relearn.mask")):
    with pytest.raises(UserError, match=msg):
      context.settings(str(tmp_path), [bad])
