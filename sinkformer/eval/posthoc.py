"""Fine-tuning a trained run on documents: the post-hoc unlearning baselines (gradient ascent,
GradDiff, NPO) and the relearning attack, as one small jitted loop.

Each document is one row (BOS + tokens, loss on every next token), so a row is a sequence
and NPO's sequence log-probabilities are row sums. Losses:
  ga        -NLL(forget)                     (maximise the forget loss)
  graddiff  -NLL(forget) + NLL(retain)
  npo       -(2/beta) E log sigmoid(-beta (log pi(y|x) - log pi_ref(y|x))) [+ NLL(retain)]
  relearn   NLL(docs)                        (the attacker's fine-tuning)
NLL is per token. The sink gate while fine-tuning is the caller's choice (`rows`' sources,
`mode`, `exclude`), so the relearning attack can run through the deployed sink-off path.
"""

from __future__ import annotations

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sinkformer import checkpoint, engine

from sinkformer.run import directory
from sinkformer.errors import UserError
from sinkformer.serve import generate

METHODS = ("ga", "graddiff", "npo", "relearn")


def rows(documents: list, sources, batch_size: int) -> list[dict]:
  """Fixed-shape batches with one document per row (loss on all of it)."""
  return [b for _, b in generate.answer_rows([[d[0]] for d in documents],
                                       [list(d[1:]) for d in documents], sources, batch_size)]


def _sequence_logp(setup, params, batch, mode, exclude):
  nll, mask = engine.token_losses(setup, params, batch, mode, exclude)
  return -nll.sum(1), mask.sum(1)


def _loss(setup, method, beta, mode, params, ref, forget, retain, exclude):
  logp, n = _sequence_logp(setup, params, forget, mode, exclude)
  real = (n > 0).astype(jnp.float32)
  nll = -logp.sum() / jnp.maximum(n.sum(), 1)
  if method == "relearn":
    return nll
  if method == "npo":
    ref_logp, _ = _sequence_logp(setup, ref, forget, mode, exclude)
    ratio = jax.nn.log_sigmoid(-beta * (logp - ref_logp)) * real
    loss = -(2 / beta) * ratio.sum() / jnp.maximum(real.sum(), 1)
  else:
    loss = -nll
  if method in ("graddiff", "npo") and retain is not None:
    r_logp, r_n = _sequence_logp(setup, params, retain, mode, exclude)
    loss = loss - r_logp.sum() / jnp.maximum(r_n.sum(), 1)
  return loss


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _step(setup, method, beta, mode, tx, params, opt, ref, forget, retain, exclude):
  loss, grads = jax.value_and_grad(
      lambda p: _loss(setup, method, beta, mode, p, ref, forget, retain, exclude))(params)
  updates, opt = tx.update(grads, opt, params)
  return optax.apply_updates(params, updates), opt, loss


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nll_sums(setup, mode, params, batch, exclude):
  logp, n = _sequence_logp(setup, params, batch, mode, exclude)
  return -logp.sum(), n.sum()


def nll(setup, params, batches: list[dict], mode: str, exclude) -> float:
  """Mean NLL per token over the batches' documents."""
  sums = jax.device_get([_nll_sums(setup, mode, params, b, exclude) for b in batches])
  return float(sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1))


@functools.cache
def _optimizer(lr: float) -> optax.GradientTransformation:
  """One object per learning rate: `_step` takes it as a static argument (hashed by
  identity), so fine-tuning runs of one architecture share the compiled step."""
  return optax.adamw(lr, weight_decay=0.0)


class Finetuner:
  """Steps of one method over cycling batches; `params` is the current model."""

  def __init__(self, setup, params, method: str, lr: float, beta: float = 0.1,
               mode: str = "source", exclude=None):
    if method not in METHODS:
      raise UserError(f"unknown method {method!r}; expected one of {METHODS}")
    self.setup, self.method, self.beta, self.mode, self.exclude = setup, method, beta, mode, exclude
    self.tx = _optimizer(lr)
    self.params, self.ref = params, params
    self.opt = self.tx.init(params)

  def step(self, forget: dict, retain: dict | None = None) -> float:
    self.params, self.opt, loss = _step(self.setup, self.method, self.beta, self.mode, self.tx,
                                        self.params, self.opt, self.ref, forget, retain,
                                        self.exclude)
    return float(loss)


def save_run(source_run: str, out: str, params, step: int, note: dict):
  """A new run directory with `params` as its checkpoint: servable and evaluable like any run."""
  os.makedirs(out, exist_ok=True)
  for name in ("config.json", "sources.sqlite"):
    shutil.copy(os.path.join(source_run, name), out)
  source = directory.load_run(source_run)
  ckpts = checkpoint.Checkpoints(os.path.join(out, "checkpoints"), every=1, keep=None)
  ckpts.save(step, {**source.state, "params": params}, {**source.meta, "posthoc": note},
             force=True)
  ckpts.wait()
  ckpts.close()


def unlearn(run_dir: str, forget: list[str], method: str, steps: int, lr: float, beta: float,
            out: str, batch_size: int = 8, retain: int = 64, epochs: int = 0,
            log=print) -> list[float]:
  """Apply a post-hoc method to a run (normally the dense control) and save the result as a
  run in `out`. Retain set: `retain` documents of sources outside the forget set. `epochs`
  > 0 replaces `steps` by that many passes over the forget documents."""
  from sinkformer.eval import context
  scorer = context.Scorer(run_dir, forget)
  cfg, _ = directory.trained_config(run_dir)
  data = context.load_data(run_dir)
  forget_docs, _ = context.documents(data, scorer.forget, cap=cfg.data.seq_len)
  if not forget_docs:
    raise UserError("the forget set has no documents in this run's data")
  retained = context.retained_documents(data, scorer.forget, retain, cfg.data.seq_len)
  setup = scorer.server.setup
  mode = "dense" if setup.spec is None else "source"
  own = lambda docs: np.asarray([s for s, _ in docs], np.int32)
  f_rows = rows([list(t) for _, t in forget_docs], own(forget_docs), batch_size)
  r_rows = rows([list(t) for _, t in retained], own(retained), batch_size) if retained else None
  tuner = Finetuner(setup, scorer.server.params, method, lr, beta, mode)
  steps = epochs * len(f_rows) if epochs else steps
  losses = []
  for i in range(steps):
    losses.append(tuner.step(f_rows[i % len(f_rows)],
                             r_rows[i % len(r_rows)] if r_rows and method != "ga" else None))
    log(f"{method} step {i + 1}/{steps}: loss {losses[-1]:.4f}")
  save_run(run_dir, out, tuner.params, scorer.server.step + steps,
           {"method": method, "steps": steps, "epochs": epochs or None, "lr": lr, "beta": beta,
            "retain": retain, "forget": forget})
  return losses
