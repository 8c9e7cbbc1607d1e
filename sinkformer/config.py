"""The base config every experiment overrides, loading experiment configs, and rejecting the
ones that cannot work, before compiling."""

from __future__ import annotations

import difflib
import importlib.util
import math

import ml_collections
from absl import flags
from ml_collections import config_flags

from sinkformer.errors import ConfigError, PARSE_ERRORS, UserError, one_line

MESH_AXES = ("data", "fsdp", "tensor")
# The values a choice may take: validation, the CLI's flags and the code that acts on them
# all read these.
POLICIES = ("exclude", "route")            # unlearn.policy (serve/serving.py)
ROUTER_TEXTS = ("title+opening", "title")  # unlearn.router
SOURCE_BY = ("document", "group")          # data.source_by, `data prepare --source-by`
READERS = ("arrayrecord", "tfds")          # data.reader (data/pipeline.py)
# The masks an attacker may fine-tune through in the relearning attack (eval/attacks.py).
RELEARN_MASKS = ("sink-off/exclude", "sink-off/route", "sink-on", "backbone")


def base() -> ml_collections.ConfigDict:
  """Every field, at the quickstart's values: experiments override what differs.

  model.attention, model.remat and model.scan_layers say how the model runs, not what it is:
  a checkpoint resumes under other values.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(kind="null", vocab_size=512, d_model=128, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=32, mlp_backbone=96, rope_base=1e4, norm_eps=1e-5,
                 tie_embeddings=False, dtype="float32",
                 attention="auto",    # xla | pallas (GPU) | splash (TPU) | auto (model/attention.py)
                 remat="none",        # none | full | dots (model/transformer.py REMAT)
                 scan_layers=True)    # False: blocks unrolled (compiles in time ~ depth)
  c.sinks = dict(num=416, k=16, selection="exact", per_layer=False, seed=0,
                 backbone_rescale=False, attn_heads=0, attn_k=0)
  c.data = dict(corpus="builtin", fallback="", dir="", source_by="document",
                reader="arrayrecord", tfds_dir="", tokenizer_hash="", holdout="", exclude="",
                val_sources=64, num_sources=400, facts_per_source=3, seed=0, seq_len=128,
                max_docs_per_row=8, workers=2)
  c.train = dict(steps=160, batch_size=16, grad_accum=1, lr=2e-3, min_lr_ratio=0.1,
                 warmup_steps=16, weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=1.0,
                 log_every=10, eval_every=40, eval_batches=4, checkpoint_every=40,
                 keep_checkpoints=3,
                 # a NULL's backbone (all but the sink units) at other rates: keeps
                 # source-specific facts out of attention and embeddings (eval: all-mlp-off)
                 backbone_lr_scale=1.0, backbone_decay_scale=1.0,
                 # when weights are gathered and gradients reduced on a data/fsdp mesh:
                 # "micro" (FSDP: per layer and micro-batch, least memory) or "step" (once
                 # per step: whole weights and gradients per device, far fewer bytes)
                 sync="micro",
                 # a source-private backbone (privacy.py): each row's backbone gradient
                 # clipped to `clip` (0: off), Gaussian noise noise*clip, epsilon at delta
                 dp=dict(clip=0.0, noise=0.0, delta=1e-6))
  # Serving: exclude = zero unlearned sources' units in every pass; route = only never pick
  # them. The router embeds each source's title+opening (or its title only).
  c.unlearn = dict(policy="exclude", router="title+opening", allow_reactivation=False)
  # Measuring forgetting (sinkformer eval): the relearning attack (the mask active while the
  # attacker fine-tunes; the learning rates it sweeps, keeping the best per model; a split
  # within or across sources), GCG extraction budgets (prompt lengths tried shortest first), and
  # the capability suite's sample sizes.
  c.eval = dict(relearn=dict(steps=10, lrs=(1e-5, 1e-4, 1e-3), split="auto",
                             mask="sink-off/exclude"),
                gcg=dict(targets=8, target_len=16, lengths=(2, 4, 8, 16), steps=20, top_k=32,
                         candidates=64, init="prefix"),
                capability=dict(clozes=400, documents=256, bootstrap=1000))
  # Axis sizes within a slice/host (-1: the rest of its devices); dcn_* repeat an axis across
  # slices (TPU) or hosts (GPU) over the data-centre network. Practice: FSDP within a slice,
  # data parallel across slices.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1)
  return c


def merged(base_dict: dict, override: dict) -> dict:
  """`override` laid over `base_dict`, section by section (for configs of older runs)."""
  out = dict(base_dict)
  for key, value in override.items():
    out[key] = (merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                else value)
  return out


def define_config_flag(fv: flags.FlagValues, argv: list[str]):
  """`--config=experiments/x.py[:presets]` with `--config.a.b=v` overrides found in argv."""
  config_flags.DEFINE_config_file(
      "config", None, "experiment config: experiments/NAME.py[:presets]; override a field "
      "with --config.SECTION.FIELD=VALUE ('sinkformer config show' lists them)",
      flag_values=fv, lock_config=True, sys_argv=argv)


def load(spec: str, overrides: tuple[str, ...] = ()):
  """`experiments/x.py[:presets]` plus `--config.a.b=v` overrides -> locked ConfigDict.

  The same parser as the CLI, so a typo'd key fails the same way.
  """
  fv = flags.FlagValues()
  argv = ["sinkformer", f"--config={spec}", *overrides]
  define_config_flag(fv, argv)
  try:
    fv(argv)
    fv.config.to_dict()   # config files load lazily: surface a load error here
    return fv.config
  except PARSE_ERRORS as e:
    raise UserError(f"cannot load config {spec!r}: {one_line(e)}") from None


def fields(cfg, prefix: str = "") -> dict:
  """Every leaf of a config as "section.field" -> value."""
  out = {}
  for key, value in cfg.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(fields(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def unknown_field(spec: str, overrides: list[str]) -> str | None:
  """The first `--config.a.b=v` override naming no field of `spec`'s config, said with the
  nearest fields (or those of its section); None when every override names one."""
  return _unknown(fields(load(spec)), overrides)


def override(cfg, items, what: str):
  """A copy of `cfg` with "section.field=value" overrides, parsed by the one parser that
  `--config.a.b=v` goes through on the command line (ml_collections' config flags): the same
  literals, the same type checks and the same nearest-field hints for every surface (`eval
  --set`, sweep points)."""
  items = [str(item) for item in items]
  bad = [item for item in items if not item.split("=")[0].strip() or "=" not in item]
  if bad:   # a top-level field (seed) has no section
    raise UserError(f"{what} {bad[0]!r}: expected [SECTION.]FIELD=VALUE")
  hint = _unknown(fields(cfg), items)
  if hint:
    raise UserError(f"{what}: {hint}")
  argv = ["sinkformer", *(f"--config.{item}" for item in items)]
  fv = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict(
        "config", ml_collections.ConfigDict(_tuples(cfg.to_dict())), flag_values=fv,
        lock_config=True, sys_argv=argv)
    fv(argv)
  except PARSE_ERRORS as e:
    raise UserError(f"{what}: {one_line(e)}") from None
  return fv.config


def _tuples(d: dict) -> dict:
  """Lists as tuples (a run's config.json holds tuples as lists; the parser takes tuples)."""
  return {k: _tuples(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v
          for k, v in d.items()}


def _unknown(known: dict, overrides: list[str]) -> str | None:
  for override in overrides:
    name = override.removeprefix("--config.").split("=")[0]
    if name in known or any(k.startswith(name + ".") for k in known):
      continue
    near = difflib.get_close_matches(name, known, n=4, cutoff=0.6) or \
        [k for k in known if k.split(".")[0] == name.split(".")[0]][:12]
    return (f"unknown config field {name!r}" + (f"; nearest: {', '.join(near)}" if near else
            f"; sections: {', '.join(sorted({k.split('.')[0] for k in known}))}") +
            " ('sinkformer config show --config FILE' lists them all)")
  return None


def presets_of(spec: str) -> dict:
  """The PRESETS an experiment file defines ({} if none)."""
  path = spec.split(":")[0]
  module_spec = importlib.util.spec_from_file_location("_experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return dict(getattr(module, "PRESETS", {}))


def apply_presets(c, arg: str | None, known: dict):
  """Apply the comma-separated presets of a `get_config` arg ("dense,smoke") in order.

  A preset is a dict of "section.field" -> value; an unknown name is an error.
  """
  for name in [a for a in (arg or "").split(",") if a]:
    if name not in known:
      raise UserError(f"unknown preset {name!r}; available: {', '.join(known)}")
    for key, value in known[name].items():
      section, field = key.split(".")
      c[section][field] = value
  return c


def dcn_shape(mesh_cfg) -> tuple[int, ...]:
  """How many slices (TPU) or processes (GPU hosts) each mesh axis spans: the data-centre
  network part of the mesh (tensor parallelism never crosses it)."""
  return (mesh_cfg.get("dcn_data", 1), mesh_cfg.get("dcn_fsdp", 1), 1)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Axis sizes of the whole mesh: the per-slice sizes (at most one -1, inferred so that
  they fill a slice) times the dcn_* sizes."""
  dcn = dcn_shape(mesh_cfg)
  for axis, size in zip(("dcn_data", "dcn_fsdp"), dcn):
    if not (isinstance(size, int) and size >= 1):
      raise ConfigError(f"mesh.{axis}", f"size {size!r} must be a positive integer")
  if num_devices % math.prod(dcn):
    raise ConfigError("mesh", f"dcn_data*dcn_fsdp = {math.prod(dcn)} slices/processes do not "
                      f"divide the {num_devices} available devices")
  per_slice = num_devices // math.prod(dcn)
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}", f"size {size} must be positive or -1 (infer)")
  if sizes.count(-1) > 1:
    raise ConfigError("mesh", "at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if per_slice % known:
      raise ConfigError("mesh", f"fixed axes ({known} devices) do not divide the "
                        f"{per_slice} devices of a slice")
    sizes[sizes.index(-1)] = per_slice // known
  if math.prod(sizes) != per_slice:
    raise ConfigError("mesh", f"{dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                      f"devices per slice but {per_slice} are available"
                      + (f" ({num_devices} over {math.prod(dcn)} slices)" if math.prod(dcn) > 1 else ""))
  return tuple(size * d for size, d in zip(sizes, dcn))


def _require(ok: bool, field: str, message: str):
  if not ok:
    raise ConfigError(field, message)


def validate_eval(e):
  """The `eval` section (also checked when `sinkformer eval` overrides it)."""
  _require(e.relearn.mask in RELEARN_MASKS, "eval.relearn.mask",
           f"{e.relearn.mask!r} is not one of {', '.join(RELEARN_MASKS)}")
  for field in ("relearn.steps", "gcg.targets", "gcg.target_len", "gcg.steps", "gcg.top_k",
                "gcg.candidates", "capability.clozes", "capability.documents",
                "capability.bootstrap"):
    section, name = field.split(".")
    _require(e[section][name] > 0, f"eval.{field}", f"must be positive, got {e[section][name]}")
  _require(len(e.relearn.lrs) > 0 and all(lr > 0 for lr in e.relearn.lrs), "eval.relearn.lrs",
           f"must be positive learning rates, got {tuple(e.relearn.lrs)}")
  _require(e.relearn.split in ("auto", "within", "across"), "eval.relearn.split",
           f"{e.relearn.split!r} is not 'auto', 'within' or 'across'")
  _require(e.gcg.init in ("prefix", "random"), "eval.gcg.init",
           f"{e.gcg.init!r} is not 'prefix' or 'random'")
  lengths = list(e.gcg.lengths)
  _require(bool(lengths) and lengths == sorted(set(lengths)) and lengths[0] > 0,
           "eval.gcg.lengths", f"{lengths} must be distinct positive prompt lengths, ascending")


def validate(cfg, num_devices: int) -> tuple[int, ...]:
  """Raise ConfigError naming the first field that cannot work; return the mesh shape."""
  m, s, t, d = cfg.model, cfg.sinks, cfg.train, cfg.data
  _require(m.kind in ("null", "dense"), "model.kind", f"{m.kind!r} is not 'null' or 'dense'")
  _require(m.dtype in ("float32", "bfloat16"), "model.dtype", f"{m.dtype!r} is not float32/bfloat16")
  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "mlp_backbone"):
    _require(m[f] > 0, f"model.{f}", f"must be positive, got {m[f]}")
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_heads",
           f"{m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
  _require(m.head_dim % 2 == 0, "model.head_dim", f"{m.head_dim} must be even for RoPE")
  _require(s.num > 0, "sinks.num", f"must be positive, got {s.num}")
  _require(0 < s.k <= s.num, "sinks.k", f"{s.k} must be in 1..sinks.num={s.num}")
  _require(s.selection in ("exact", "bernoulli"), "sinks.selection",
           f"{s.selection!r} is not 'exact' or 'bernoulli'")
  _require(0 <= s.attn_heads < m.num_heads, "sinks.attn_heads",
           f"{s.attn_heads} must be in 0..model.num_heads-1={m.num_heads - 1}")
  _require(s.attn_heads == 0 or 0 < s.attn_k <= s.attn_heads, "sinks.attn_k",
           f"{s.attn_k} must be in 1..sinks.attn_heads={s.attn_heads}")
  _require(d.seq_len > 1, "data.seq_len", f"must be > 1, got {d.seq_len}")
  _require(d.max_docs_per_row >= 1, "data.max_docs_per_row", "must be >= 1")
  _require(d.source_by in SOURCE_BY, "data.source_by",
           f"{d.source_by!r} is not one of {', '.join(SOURCE_BY)}")
  _require(d.reader in READERS, "data.reader", f"{d.reader!r} is not one of {', '.join(READERS)}")
  _require(d.fallback in ("", "builtin"), "data.fallback", f"{d.fallback!r} is not '' or 'builtin'")
  _require(d.workers >= 1, "data.workers", f"must be >= 1, got {d.workers}")
  _require(cfg.unlearn.policy in POLICIES, "unlearn.policy",
           f"{cfg.unlearn.policy!r} is not one of {', '.join(POLICIES)}")
  _require(cfg.unlearn.router in ROUTER_TEXTS, "unlearn.router",
           f"{cfg.unlearn.router!r} is not one of {', '.join(ROUTER_TEXTS)}")
  validate_eval(cfg.eval)
  _require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
  _require(t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"{t.grad_accum} must divide train.batch_size={t.batch_size}")
  _require(0 <= t.warmup_steps < t.steps, "train.warmup_steps",
           f"{t.warmup_steps} must be in 0..train.steps-1={t.steps - 1}: with fewer steps, "
           f"lower it too (--config.train.warmup_steps={t.steps // 5})")
  for field in ("backbone_lr_scale", "backbone_decay_scale"):
    _require(t[field] >= 0, f"train.{field}", f"must be >= 0, got {t[field]}")
  _require(t.sync in ("micro", "step"), "train.sync", f"{t.sync!r} is not 'micro' or 'step'")
  if t.dp.clip > 0:   # what the privacy argument needs (privacy.py)
    _require(m.kind == "null", "train.dp.clip", "a source-private backbone is a NULL's "
             "(the dense control has no sinks to keep sources apart); set 0 for it")
    _require(d.max_docs_per_row == 1, "data.max_docs_per_row", "must be 1 with train.dp: a "
             "row must be one source's window for per-row clipping to bound a source")
    _require(t.grad_accum == 1, "train.grad_accum", "must be 1 with train.dp")
    _require(t.dp.noise >= 0, "train.dp.noise", f"must be >= 0, got {t.dp.noise}")
    _require(0 < t.dp.delta < 1, "train.dp.delta", f"must be in (0, 1), got {t.dp.delta}")
  _require(t.checkpoint_every > 0, "train.checkpoint_every", f"must be positive, got "
           f"{t.checkpoint_every} (a checkpoint is also written at the last step)")

  shape = mesh_shape(cfg.mesh, num_devices)
  sizes = dict(zip(MESH_AXES, shape))
  replicas = sizes["data"] * sizes["fsdp"]
  micro = t.batch_size // t.grad_accum
  _require(micro % replicas == 0, "train.batch_size",
           f"micro-batch {micro} (batch_size/grad_accum) is not divisible by mesh "
           f"data*fsdp={replicas}")
  _require(t.sync == "micro" or sizes["tensor"] == 1, "train.sync",
           f"'step' needs mesh.tensor = 1 (got {sizes['tensor']}); use 'micro'")
  for field, size in (("model.d_model", m.d_model),):
    _require(size % sizes["fsdp"] == 0, field, f"{size} is not divisible by mesh.fsdp={sizes['fsdp']}")
  for field, size in (("model.num_heads", m.num_heads), ("model.num_kv_heads", m.num_kv_heads),
                      ("model.vocab_size", m.vocab_size),
                      ("model.mlp_backbone + sinks.num", m.mlp_backbone + s.num)):
    _require(size % sizes["tensor"] == 0, field,
             f"{size} is not divisible by mesh.tensor={sizes['tensor']}")
  return shape
