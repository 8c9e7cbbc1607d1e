"""The trainer: a pure, jitted train step over split NNX state, and the loop around it.

State is a plain dict `{"step", "params", "opt"}` of arrays (checkpointable as is; see
engine.py). The step is `jax.jit` with explicit in/out shardings on the run's mesh and the
state donated. Batches are a pure function of the step (pipeline.Batches), so a run can
restart anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from sinkformer import checkpoint, engine, privacy, storage
from sinkformer.data import pipeline
from sinkformer.errors import Stopped, UserError
from sinkformer.model import flops, sinks, transformer
from sinkformer.parallel import mesh as mesh_lib
from sinkformer.run import switchboard
from sinkformer.train import report


def resume_or_init(setup: engine.Setup, ckpts: checkpoint.Checkpoints,
                   data_identity: dict) -> tuple[dict, dict]:
  """(state, metadata) of the newest intact checkpoint if there is one, else a fresh state
  and {}. A checkpoint of another architecture, tokenizer or source catalog is refused
  before anything is read."""
  def check(meta):
    diffs = checkpoint.differences(meta["config"], json.loads(setup.cfg.to_json()))
    diffs += checkpoint.data_differences(meta.get("data", {}), data_identity)
    if diffs:
      raise UserError(f"{ckpts.directory} was written by an incompatible config: "
                      + "; ".join(diffs) + " (use another --workdir, or the original config)")

  restored = ckpts.restore_latest(engine.abstract_state(setup), check)
  return (engine.init_state(setup, setup.cfg.seed), {}) if restored is None else restored


def _per_document(setup: engine.Setup, batch, values):
  """Sum `values[B, T]` into document slots [B, D] (sized by the batch, not by #sources)."""
  rows = jnp.arange(values.shape[0])[:, None]
  empty = jnp.zeros((values.shape[0], setup.max_docs), values.dtype)
  return empty.at[rows, batch["segment_ids"]].add(values, mode="drop")


def _microbatches(batch, accum: int):
  """[B, ...] -> [accum, B/accum, ...] taking every accum-th row, so each micro-batch keeps
  the batch's sharding over data/fsdp instead of landing on one device group."""
  split = lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _accumulate(setup: engine.Setup, params, batch):
  """(gradients in float32, summed loss, real target tokens, per-document sums) of `params`
  over `batch` in train.grad_accum micro-batches."""
  def loss_fn(params, micro):
    nll, mask = engine.token_losses(setup, params, micro)
    docs = {"source": sinks.doc_sources(micro["source_ids"], micro["segment_ids"], setup.max_docs),
            "loss": _per_document(setup, micro, nll), "tokens": _per_document(setup, micro, mask)}
    return nll.sum(), (mask.sum(), docs)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(carry, micro):
    grads, loss, tokens = carry
    (l, (n, docs)), g = grad_fn(params, micro)
    return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), loss + l,
            tokens + n), docs

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grads, loss, tokens), docs = jax.lax.scan(
      accumulate, (zeros, 0.0, 0.0), _microbatches(batch, setup.cfg.train.grad_accum))
  return grads, loss, tokens, docs


def _per_step(setup: engine.Setup, params, batch):
  """Gradients with one gather and one reduction per step (train.sync = "step"): in a
  shard_map over (data, fsdp), every device gathers all the weights once, in the compute
  dtype, runs its own rows' micro-batches, and the summed float32 gradients are
  reduce-scattered back to the parameters' layout once. Costs whole weights and whole
  gradients per device; moves the weights once, not twice per layer and micro-batch."""
  dtype = transformer.DTYPES[setup.dims.dtype]
  replicas = ("data", "fsdp")   # train.sync = "step" needs mesh.tensor = 1 (config.validate)
  specs = jax.tree.map(lambda s: mesh_lib.over(s.spec, replicas), setup.state_shardings["params"])

  def split_dim(spec):
    """The dimension a parameter is split along over fsdp (None: it is whole)."""
    return next((i for i, axes in enumerate(spec) if axes == "fsdp"), None)

  def gather(p, spec):
    p = p.astype(dtype) if p.ndim >= 2 else p
    dim = split_dim(spec)
    return p if dim is None else jax.lax.all_gather(p, "fsdp", axis=dim, tiled=True)

  over = tuple(a for a in replicas if setup.mesh.shape[a] > 1)   # axes that split the rows
  total = lambda x: jax.lax.psum(x, over) if over else x

  def reduce(g, spec):
    dim = split_dim(spec)
    if dim is None:
      return total(g)
    g = jax.lax.psum_scatter(g, "fsdp", scatter_dimension=dim, tiled=True)
    return jax.lax.psum(g, "data") if "data" in over else g

  def local(params, batch):
    whole = jax.tree.map(gather, params, specs)
    grads, loss, tokens, docs = _accumulate(setup, whole, batch)
    return jax.tree.map(reduce, grads, specs), total(loss), total(tokens), docs

  rows = P(replicas)
  return jax.shard_map(local, mesh=setup.mesh, in_specs=(specs, {k: rows for k in batch}),
                       out_specs=(specs, P(), P(), P(None, replicas)),
                       axis_names=set(replicas), check_vma=False)(params, batch)


def _private(setup: engine.Setup, params, batch):
  """_accumulate's results with the backbone's part of the gradient replaced by the sum of
  each row's backbone gradient clipped to train.dp.clip (privacy.py; noise is added by the
  optimizer, which alone holds a key)."""
  grads, loss, tokens, docs = _accumulate(setup, params, batch)   # grad_accum is 1 here
  backbone = transformer.backbone_units(setup.dims, setup.cfg.sinks.attn_heads)
  clipped = privacy.backbone_sum(lambda p, rows: engine.token_losses(setup, p, rows)[0].sum(),
                                 params, batch, backbone, setup.cfg.train.dp.clip)
  return (jax.tree.map(lambda c, g, m: c + (1 - m) * g, clipped, grads, backbone), loss,
          tokens, docs)


def train_step(setup: engine.Setup, state: dict, batch: dict):
  """One optimizer update on a (possibly accumulated) batch -> (new state, metrics)."""
  # train.sync "micro" leaves communication to the partitioner (FSDP): each layer's weights
  # gathered where used (in the compute dtype: it casts before it gathers) in every
  # micro-batch, and every micro-batch's gradients reduced at the backward matmul. The
  # least memory: no device ever holds all the weights.
  sync = _per_step if setup.cfg.train.sync == "step" and setup.mesh.size > 1 else _accumulate
  private = privacy.enabled(setup.cfg)
  grads, loss, tokens, docs = (_private if private else sync)(setup, state["params"], batch)
  tokens = jnp.maximum(tokens, 1.0)
  # the mean over every real target token; a private step divides by a constant instead
  scale = privacy.normalizer(setup.cfg) if private else tokens
  grads = jax.tree.map(lambda g: g / scale, grads)
  updates, opt = setup.tx.update(grads, state["opt"], state["params"])
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt": opt}
  docs = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), docs)
  metrics = {"loss": loss / tokens, "tokens": tokens, "grad_norm": optax.tree.norm(grads),
             "lr": setup.schedule(state["step"]), "docs": docs}
  return new_state, metrics


def eval_step(setup: engine.Setup, params, batch):
  """Summed loss and token count on one batch, with own sinks and (NULL) backbone only."""
  modes = {"loss": "train"} if setup.spec is None else {"loss": "train", "backbone_loss": "backbone"}
  out = {}
  for name, mode in modes.items():
    nll, mask = engine.token_losses(setup, params, batch, mode)
    out[name] = nll.sum()
  out["tokens"] = mask.sum()
  return out


def jit_train_step(setup: engine.Setup, fields):
  """The train step, jitted with explicit shardings (batch `fields` [B, T]); the state
  argument is donated. Trace it under mesh.using(setup.mesh)."""
  state_sh = setup.state_shardings
  batch_sh = {k: setup.batch_sharding for k in fields}
  return jax.jit(partial(train_step, setup), in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, mesh_lib.replicated(setup.mesh)),
                 donate_argnums=0)


def compile_train_step(setup: engine.Setup, state, example_batch):
  """The train step compiled ahead of time for this process's devices."""
  with mesh_lib.using(setup.mesh):   # activation constraints and kernels see the mesh
    return jit_train_step(setup, example_batch).lower(state, example_batch).compile()


def compile_eval_step(setup: engine.Setup, params, example_batch):
  batch_sh = {k: setup.batch_sharding for k in example_batch}
  step = jax.jit(partial(eval_step, setup), in_shardings=(setup.state_shardings["params"], batch_sh),
                 out_shardings=mesh_lib.replicated(setup.mesh))
  with jax.set_mesh(setup.mesh):
    return step.lower(params, example_batch).compile()


def _privacy_budget(cfg, data, reporter):
  """With train.dp: ε after `done` steps, from the run's own batch plan (privacy.py), and the
  whole run's said up front; None without it."""
  t = cfg.train
  if not privacy.enabled(cfg):
    return None
  steps, rows = privacy.participation(privacy.sources_per_step(data.train, 0, t.steps, None))
  spent = lambda done: privacy.epsilon(t.dp.noise, int(steps[done - 1]), int(rows[done - 1]),
                                       t.dp.delta)
  reporter.line(f"private backbone: rows clipped to {t.dp.clip}, noise {t.dp.noise}; a source "
                f"takes part in at most {steps[-1]} steps, {rows[-1]} row(s) in one: "
                f"epsilon {spent(t.steps):.3g} at delta {t.dp.delta:g} for the whole run")
  return spent


class _Meter:
  """Throughput between log lines (tokens/s, MFU, the data loader's share) and the ETA."""

  def __init__(self, tokens_per_step: int, flops_token: float, peak: float, devices: int,
               first: int, total: int):
    self.tokens_per_step, self.flops_token, self.peak, self.devices = (
        tokens_per_step, flops_token, peak, devices)
    self.first, self.total = first, total
    self.start = self.last = time.perf_counter()
    self.data_time = 0.0   # seconds waiting for batches since the last line

  def row(self, fetched: list[dict], done: int) -> tuple[dict, float]:
    """The logged row of the steps in `fetched` (the last is `done`), and the ETA."""
    now = time.perf_counter()
    elapsed = now - self.last
    tok_s = len(fetched) * self.tokens_per_step / elapsed
    row = {"loss": float(np.mean([m["loss"] for m in fetched])),
           "grad_norm": float(fetched[-1]["grad_norm"]), "lr": float(fetched[-1]["lr"]),
           "tokens_per_s": tok_s,
           "mfu": flops.mfu(tok_s, self.flops_token, self.peak, self.devices),
           "data_frac": self.data_time / elapsed}
    eta = (now - self.start) / (done - self.first) * (self.total - done)
    self.data_time, self.last = 0.0, time.perf_counter()
    return row, eta

  def skip(self):
    """What ran since the last line (an eval) is not training throughput."""
    self.last = time.perf_counter()


def _aggregate_sources(docs: list[dict]):
  source = np.concatenate([d["source"].ravel() for d in docs])
  loss = np.concatenate([d["loss"].ravel() for d in docs])
  tokens = np.concatenate([d["tokens"].ravel() for d in docs])
  keep = (source > 0) & (tokens > 0)
  ids, inverse = np.unique(source[keep], return_inverse=True)
  tok = np.bincount(inverse, tokens[keep])
  return ids, np.bincount(inverse, loss[keep]) / tok, tok.astype(np.int64)


def _evaluate(setup: engine.Setup, eval_fn, params, splits: dict) -> dict:
  """Mean loss per split and mode: e.g. seen_loss, seen_backbone_loss, unseen_loss, ...
  Split s is evaluated on the first eval_batches batches of its stream's epoch 0."""
  t = setup.cfg.train
  rows = engine.process_rows(setup)
  out = {}
  for split, stream in splits.items():
    sums = [jax.device_get(eval_fn(params, engine.put_batch(
                setup, stream.rows(b * t.batch_size + rows), rows)))
            for b in range(t.eval_batches)]
    n = sum(s["tokens"] for s in sums)
    out.update({f"{split}_{name}": float(sum(s[name] for s in sums) / n)
                for name in sums[0] if name != "tokens"})
  return out


def train(cfg, workdir: str, devices=None):
  """Train in `workdir` (a local path or a bucket: see storage.run_dir), resuming from its
  newest intact checkpoint if there is one; see _train."""
  with storage.run_dir(workdir, write=jax.process_index() == 0) as local, _signals() as stop:
    return _train(cfg, local, devices, stop)


@contextlib.contextmanager
def _signals():
  """SIGINT (Ctrl-C) and SIGTERM (preemption) ask the loop to save and stop after the step
  in flight, however long that is (compilation included: interrupting XLA or an Orbax save
  half-way is what crashes). A second Ctrl-C quits at once, without saving."""
  stop: list[int] = []

  def ask(signum, _):
    if not stop and signum == signal.SIGINT:
      print("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to "
            "quit without saving)", file=sys.stderr, flush=True)
      signal.signal(signal.SIGINT, signal.default_int_handler)
    stop.append(signum)

  previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _train(cfg, workdir: str, devices=None, stop=()):
  """Train, resuming from the workdir's newest intact checkpoint if there is one.

  Returns (final state, list of logged metric dicts); raises Stopped once `stop` holds a
  signal (the train() wrapper fills it from SIGINT and SIGTERM), after saving. Call it
  from the main thread. Nothing is written into the run directory before the resume
  checks pass (a refused resume leaves it as it was).

  Every `eval_every` steps the loss is measured with each document's own sinks and with the
  backbone only, on training sources ("seen") and on held-out sources ("unseen"): the gap
  between seen own-sink and seen backbone loss is what the sinks memorised.
  """
  setup = engine.build(cfg, devices)
  t, d = cfg.train, cfg.data
  say = lambda text: jax.process_index() == 0 and print(text, flush=True)
  pipeline.prepare(cfg, say)   # a raw corpus the first time (load only opens)
  data = pipeline.load(cfg, say)
  rows = engine.process_rows(setup)

  os.makedirs(workdir, exist_ok=True)
  ckpts = checkpoint.Checkpoints(storage.checkpoints_of(workdir), t.checkpoint_every,
                                 t.keep_checkpoints)
  try:
    state, restored = resume_or_init(setup, ckpts, data.identity)
  except BaseException:
    ckpts.close()
    raise
  if jax.process_index() == 0:   # the checks passed: now the run directory is written
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      f.write(cfg.to_json(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))
    switchboard.create(workdir, data.catalog, data.sources)   # once; resumes keep it
  data.train.remember(restored.get("data_rows", []))   # no need to plan the epochs behind
  first = int(state["step"])
  reporter = report.Reporter(workdir, t.steps, first)
  if first:
    reporter.line(f"resumed from {ckpts.directory}/{first}")
  n_params = transformer.count_params(state["params"])
  flops_token = flops.flops_per_token(setup.dims, d.seq_len)
  peak, peak_src = flops.device_peak(cfg.model.dtype)
  reporter.line(f"data: {data.summary}")
  spent = _privacy_budget(cfg, data, reporter)
  reporter.line(f"{cfg.model.kind} model: {n_params / 1e6:.2f}M params, mesh "
                f"{dict(setup.mesh.shape)}, {flops_token / 1e6:.1f} MFLOP/token, peak "
                f"{peak / 1e9:.0f} GFLOP/s ({peak_src})")
  example = engine.put_batch(setup, {f: np.zeros((len(rows), d.seq_len), np.int32)
                                     for f in pipeline.FIELDS}, rows)
  reporter.line("compiling the train step ...")
  compile_start = time.perf_counter()
  train_fn = compile_train_step(setup, state, example)
  eval_fn = compile_eval_step(setup, state["params"], example) if t.eval_every else None
  reporter.line(f"compiled in {time.perf_counter() - compile_start:.1f} s")
  reporter.started()

  history, pending = [], []
  meta = {"config": json.loads(cfg.to_json()), "data": data.identity,
          "layout": {"mesh": dict(setup.mesh.shape), "processes": jax.process_count()}}
  batches = pipeline.iterate(data.train, first, t.steps, rows, threads=d.workers,
                             put=lambda local: engine.put_batch(setup, local, rows))
  meter = _Meter(t.batch_size * d.seq_len, flops_token, peak, setup.mesh.size, first, t.steps)
  try:
    if stop:   # asked during loading or compilation: no step has run since the checkpoint
      raise Stopped(stop[0], first, False)
    for step in range(first, t.steps):
      t0 = time.perf_counter()
      batch = next(batches)   # already on the devices
      meter.data_time += time.perf_counter() - t0
      state, metrics = train_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      saved = (done % t.checkpoint_every == 0 or done == t.steps or bool(stop)) and ckpts.save(
          done, state, {**meta, "data_rows": data.train.rows_per_epoch()}, force=True)
      reporter.advance(1)
      if saved and jax.process_index() == 0 and storage.is_remote(storage.checkpoints_of(workdir)):
        reporter.flush()
        storage.push(workdir)   # the bucket's metrics keep up with its checkpoints
      if done % t.log_every == 0 or done == t.steps:
        fetched = jax.device_get(pending)
        row, eta = meter.row(fetched, done)
        row["epoch"] = data.train.epoch_of(done)
        if spent is not None:
          row["epsilon"] = spent(done)
        reporter.line(f"step {done}/{t.steps} | loss {row['loss']:.4f} | "
                      f"{report.human(row['tokens_per_s'])} tok/s | MFU {100 * row['mfu']:.2f}% | "
                      f"data {100 * row['data_frac']:.1f}% | ETA {report.duration(eta)}"
                      + (f" | epsilon {row['epsilon']:.3g}" if spent is not None else ""))
        reporter.scalars(done, row, "train")
        reporter.per_source(done, *_aggregate_sources([m["docs"] for m in fetched]))
        reporter.postfix(f"loss {row['loss']:.3f}")
        history.append({"step": done, **row})
        pending = []
      if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
        row = _evaluate(setup, eval_fn, state["params"], {"seen": data.seen, "unseen": data.unseen})
        reporter.line(f"eval {done}: " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()))
        reporter.scalars(done, row, "val")
        history.append({"step": done, "split": "val", **row})
        meter.skip()   # eval time is not training throughput
      if stop:   # the signal may have arrived after this step's save decision
        if not saved:
          ckpts.save(done, state, {**meta, "data_rows": data.train.rows_per_epoch()}, force=True)
        ckpts.wait()
        stopped = Stopped(stop[0], done, True)
        reporter.line(str(stopped))
        raise stopped
  finally:
    ckpts.wait()
    ckpts.close()
    reporter.close()
  return state, history

