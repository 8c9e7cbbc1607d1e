"""The trainer: a pure, jitted train step over split NNX state, and the loop around it.

State is a plain dict `{"step", "params", "opt"}` of arrays (checkpointable as is). The step
is `jax.jit` with explicit in/out shardings on the run's mesh and the state donated. Batches
are a pure function of the step (data.Batches), so a run can restart anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sinkformer import config as config_lib
from sinkformer import checkpoint, data as data_lib, flops, mesh as mesh_lib, model, report, sinks
from sinkformer import switchboard
from sinkformer.errors import UserError


@dataclasses.dataclass(eq=False)   # hashed by identity: a static argument of jitted functions
class Setup:
  """Everything derived from a config that the step functions close over."""
  cfg: object
  mesh: jax.sharding.Mesh
  dims: model.Dims
  spec: sinks.SinkSpec | None   # None: the dense control
  graphdef: object
  state_shardings: dict         # {"step", "params", "opt"} -> NamedSharding trees
  schedule: optax.Schedule
  tx: optax.GradientTransformation

  @property
  def max_docs(self) -> int:    # document slots per row; slot 0 is padding
    return self.cfg.data.max_docs_per_row + 1

  @property
  def batch_sharding(self):
    return mesh_lib.batch_sharding(self.mesh)


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup-cosine and global-norm clipping; norms are not decayed."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, t.warmup_steps, t.steps, end_value=t.lr * t.min_lr_ratio)
  decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(t.clip_norm),
                   optax.adamw(schedule, t.b1, t.b2, weight_decay=t.weight_decay, mask=decay))
  return tx, schedule


def build(cfg, devices=None) -> Setup:
  devices = jax.devices() if devices is None else devices
  shape = config_lib.validate(cfg, len(devices))
  mesh = mesh_lib.make_mesh(shape, devices)
  dims = model.Dims.from_config(cfg)
  graphdef, abstract_params, axes = model.abstract(dims)
  tx, schedule = make_optimizer(cfg.train)
  return Setup(cfg, mesh, dims, sinks.SinkSpec.from_config(cfg), graphdef,
               _state_shardings(tx, abstract_params, axes, mesh), schedule, tx)


def _state_shardings(tx, abstract_params, axes, mesh) -> dict:
  """Optimizer moments are laid out like their parameters; counters are replicated."""
  params = mesh_lib.param_shardings(axes, mesh)
  rep = mesh_lib.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_params),
                              params, transform_non_params=lambda _: rep)
  return {"step": rep, "params": params, "opt": opt}


def _init(setup: Setup, seed: int) -> dict:
  params = model.init(setup.dims, seed)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": setup.tx.init(params)}


def init_state(setup: Setup, seed: int) -> dict:
  """The whole train state created directly in its shards (nothing on one device first)."""
  return jax.jit(partial(_init, setup, seed), out_shardings=setup.state_shardings)()


def abstract_state(setup: Setup) -> dict:
  """Shapes, dtypes and shardings of the train state on this run's mesh (a restore target)."""
  shapes = jax.eval_shape(partial(_init, setup, 0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, setup.state_shardings)


def resume_or_init(setup: Setup, ckpts: checkpoint.Checkpoints, data_identity: dict) -> dict:
  """The newest intact checkpoint's state if there is one, else a fresh state. A checkpoint
  of another architecture, tokenizer or source catalog is refused."""
  restored = ckpts.restore_latest(abstract_state(setup))
  if restored is None:
    return init_state(setup, setup.cfg.seed)
  state, meta = restored
  diffs = checkpoint.differences(meta["config"], json.loads(setup.cfg.to_json()))
  diffs += checkpoint.data_differences(meta.get("data", {}), data_identity)
  if diffs:
    raise UserError(f"{ckpts.directory} was written by an incompatible config: "
                    + "; ".join(diffs) + " (use another --workdir, or the original config)")
  return state


def logits_in_mode(setup: Setup, params, batch, mode: str = "train", exclude=None):
  """The model's logits [B, T, V] on packed rows under an apply mode of sinks.MODES."""
  gate = None
  if setup.spec is not None and mode != "dense":
    gate = sinks.make_gate(setup.spec, mode, segment_ids=batch["segment_ids"],
                           source_ids=batch["source_ids"], row_sources=batch.get("row_sources"),
                           exclude=exclude, max_docs=setup.max_docs)
  return model.apply(setup.graphdef, params, batch, gate)


def token_losses(setup: Setup, params, batch, mode: str = "train", exclude=None):
  """(nll[B, T] masked to real targets, mask[B, T]) under an apply mode of sinks.MODES."""
  logits = logits_in_mode(setup, params, batch, mode, exclude)
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * mask
  return nll, mask


def _per_document(setup: Setup, batch, values):
  """Sum `values[B, T]` into document slots [B, D] (sized by the batch, not by #sources)."""
  rows = jnp.arange(values.shape[0])[:, None]
  empty = jnp.zeros((values.shape[0], setup.max_docs), values.dtype)
  return empty.at[rows, batch["segment_ids"]].add(values, mode="drop")


def _microbatches(batch, accum: int):
  """[B, ...] -> [accum, B/accum, ...] taking every accum-th row, so each micro-batch keeps
  the batch's sharding over data/fsdp instead of landing on one device group."""
  split = lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def train_step(setup: Setup, state: dict, batch: dict):
  """One optimizer update on a (possibly accumulated) batch -> (new state, metrics)."""
  def loss_fn(params, micro):
    nll, mask = token_losses(setup, params, micro)
    docs = {"source": sinks.doc_sources(micro["source_ids"], micro["segment_ids"], setup.max_docs),
            "loss": _per_document(setup, micro, nll), "tokens": _per_document(setup, micro, mask)}
    return nll.sum(), (mask.sum(), docs)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(carry, micro):
    grads, loss, tokens = carry
    (l, (n, docs)), g = grad_fn(state["params"], micro)
    return (jax.tree.map(jnp.add, grads, g), loss + l, tokens + n), docs

  zeros = jax.tree.map(jnp.zeros_like, state["params"])
  (grads, loss, tokens), docs = jax.lax.scan(
      accumulate, (zeros, 0.0, 0.0), _microbatches(batch, setup.cfg.train.grad_accum))
  tokens = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g / tokens, grads)   # mean over every real target token
  updates, opt = setup.tx.update(grads, state["opt"], state["params"])
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt": opt}
  docs = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), docs)
  metrics = {"loss": loss / tokens, "tokens": tokens, "grad_norm": optax.tree.norm(grads),
             "lr": setup.schedule(state["step"]), "docs": docs}
  return new_state, metrics


def eval_step(setup: Setup, params, batch):
  """Summed loss and token count on one batch, with own sinks and (NULL) backbone only."""
  modes = {"loss": "train"} if setup.spec is None else {"loss": "train", "backbone_loss": "backbone"}
  out = {}
  for name, mode in modes.items():
    nll, mask = token_losses(setup, params, batch, mode)
    out[name] = nll.sum()
  out["tokens"] = mask.sum()
  return out


def compile_train_step(setup: Setup, state, example_batch):
  """AOT-compiled train step with explicit shardings; the state argument is donated."""
  state_sh = setup.state_shardings
  batch_sh = {k: setup.batch_sharding for k in example_batch}
  step = jax.jit(partial(train_step, setup), in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, mesh_lib.replicated(setup.mesh)), donate_argnums=0)
  return step.lower(state, example_batch).compile()


def compile_eval_step(setup: Setup, params, example_batch):
  batch_sh = {k: setup.batch_sharding for k in example_batch}
  step = jax.jit(partial(eval_step, setup), in_shardings=(setup.state_shardings["params"], batch_sh),
                 out_shardings=mesh_lib.replicated(setup.mesh))
  return step.lower(params, example_batch).compile()


def process_rows(batch_size: int) -> tuple[int, int]:
  """[start, stop) of the global batch's rows that this process feeds."""
  share = batch_size // jax.process_count()
  return jax.process_index() * share, (jax.process_index() + 1) * share


def put_batch(setup: Setup, local: dict) -> dict:
  """Host numpy (this process's rows) -> global jax.Arrays sharded over the mesh."""
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(
      setup.batch_sharding, v, (v.shape[0] * n,) + v.shape[1:]) for k, v in local.items()}


def _aggregate_sources(docs: list[dict]):
  source = np.concatenate([d["source"].ravel() for d in docs])
  loss = np.concatenate([d["loss"].ravel() for d in docs])
  tokens = np.concatenate([d["tokens"].ravel() for d in docs])
  keep = (source > 0) & (tokens > 0)
  ids, inverse = np.unique(source[keep], return_inverse=True)
  tok = np.bincount(inverse, tokens[keep])
  return ids, np.bincount(inverse, loss[keep]) / tok, tok.astype(np.int64)


def _evaluate(setup: Setup, eval_fn, params, splits: dict) -> dict:
  """Mean loss per split and mode: e.g. seen_loss, seen_backbone_loss, unseen_loss, ...
  Split s is evaluated on the first eval_batches batches of its stream's epoch 0."""
  t = setup.cfg.train
  start, stop = process_rows(t.batch_size)
  out = {}
  for split, stream in splits.items():
    sums = [jax.device_get(eval_fn(params, put_batch(
                setup, stream.rows(b * t.batch_size + np.arange(start, stop)))))
            for b in range(t.eval_batches)]
    n = sum(s["tokens"] for s in sums)
    out.update({f"{split}_{name}": float(sum(s[name] for s in sums) / n)
                for name in sums[0] if name != "tokens"})
  return out


def train(cfg, workdir: str, devices=None):
  """Train, resuming from the workdir's newest intact checkpoint if there is one.

  Returns (final state, list of logged metric dicts). Call it from the main thread (it
  handles SIGTERM by saving and stopping).

  Every `eval_every` steps the loss is measured with each document's own sinks and with the
  backbone only, on training sources ("seen") and on held-out sources ("unseen"): the gap
  between seen own-sink and seen backbone loss is what the sinks memorised.
  """
  setup = build(cfg, devices)
  t, d = cfg.train, cfg.data
  say = lambda text: jax.process_index() == 0 and print(text, flush=True)
  data = data_lib.load(cfg, say)
  rows = process_rows(t.batch_size)

  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
    switchboard.create(workdir, data.catalog, data.sources)   # once; resumes keep it
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), t.checkpoint_every,
                                 t.keep_checkpoints)
  state = resume_or_init(setup, ckpts, data.identity)
  first = int(state["step"])
  reporter = report.Reporter(workdir, t.steps, first)
  if first:
    reporter.line(f"resumed from {ckpts.directory}/{first}")
  n_params = model.count_params(state["params"])
  flops_token = flops.flops_per_token(setup.dims, d.seq_len)
  peak, peak_src = flops.device_peak(cfg.model.dtype)
  reporter.line(f"data: {data.summary}")
  reporter.line(f"{cfg.model.kind} model: {n_params / 1e6:.2f}M params, mesh "
                f"{dict(setup.mesh.shape)}, {flops_token / 1e6:.1f} MFLOP/token, peak "
                f"{peak / 1e9:.0f} GFLOP/s ({peak_src})")
  example = put_batch(setup, data.train.batch(0, *rows))
  train_fn = compile_train_step(setup, state, example)
  eval_fn = compile_eval_step(setup, state["params"], example) if t.eval_every else None

  # SIGTERM (preemption): finish the step in flight, save, and stop.
  stop = []
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
  history, pending, data_time = [], [], 0.0
  meta = {"config": json.loads(cfg.to_json()), "data": data.identity,
          "layout": {"mesh": dict(setup.mesh.shape), "processes": jax.process_count()}}
  tokens_per_step = t.batch_size * d.seq_len
  batches = data_lib.iterate(data.train, first, t.steps, *rows, threads=d.workers)
  start = last = time.perf_counter()
  for step in range(first, t.steps):
    t0 = time.perf_counter()
    batch = put_batch(setup, next(batches))
    data_time += time.perf_counter() - t0
    state, metrics = train_fn(state, batch)
    pending.append(metrics)
    done = step + 1
    saved = (done % t.checkpoint_every == 0 or done == t.steps or bool(stop)) and ckpts.save(
        done, state, meta, force=True)
    reporter.advance(1)
    if done % t.log_every == 0 or done == t.steps:
      fetched = jax.device_get(pending)
      now = time.perf_counter()
      elapsed, steps = now - last, len(fetched)
      tok_s = steps * tokens_per_step / elapsed
      row = {"loss": float(np.mean([m["loss"] for m in fetched])),
             "grad_norm": float(fetched[-1]["grad_norm"]), "lr": float(fetched[-1]["lr"]),
             "tokens_per_s": tok_s, "mfu": flops.mfu(tok_s, flops_token, peak, setup.mesh.size),
             "data_frac": data_time / elapsed, "epoch": data.train.epoch_of(done)}
      eta = (now - start) / (done - first) * (t.steps - done)
      reporter.line(f"step {done}/{t.steps} | loss {row['loss']:.4f} | "
                    f"{report.human(tok_s)} tok/s | MFU {100 * row['mfu']:.2f}% | "
                    f"data {100 * row['data_frac']:.1f}% | ETA {report.duration(eta)}")
      reporter.scalars(done, row, "train")
      reporter.per_source(done, *_aggregate_sources([m["docs"] for m in fetched]))
      reporter.postfix(f"loss {row['loss']:.3f}")
      history.append({"step": done, **row})
      pending, data_time, last = [], 0.0, time.perf_counter()
    if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
      row = _evaluate(setup, eval_fn, state["params"], {"seen": data.seen, "unseen": data.unseen})
      reporter.line(f"eval {done}: " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()))
      reporter.scalars(done, row, "val")
      history.append({"step": done, "split": "val", **row})
      last = time.perf_counter()   # eval time is not training throughput
    if stop:   # the signal may have arrived after this step's save decision
      if not saved:
        ckpts.save(done, state, meta, force=True)
      reporter.line(f"SIGTERM: stopped after step {done}, checkpoint saved")
      break
  ckpts.wait()
  ckpts.close()
  signal.signal(signal.SIGTERM, previous_handler)
  reporter.close()
  return state, history
