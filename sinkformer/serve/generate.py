"""Sampling with a KV cache, and scoring answers, under any sink mode (pure, jitted).

Prompts are left-padded to a common length so every row's last prompt token sits in the
same column; pads are invisible to attention and positions count real tokens only. A row's
sinks come from `row_sources` (mode "source": a source id per row, 0 = none) or are all off
(mode "backbone"); `exclude` zeroes unlearned units in every pass. Shapes are bucketed so a
session compiles a handful of functions, not one per prompt.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sinkformer import engine
from sinkformer.data import tokenizer as tok_lib
from sinkformer.model import sinks, transformer


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new: int = 32
  temperature: float = 0.0   # 0: greedy
  top_k: int = 0             # 0: no top-k filter
  top_p: float = 1.0         # 1: no nucleus filter


def bucket(n: int, least: int = 16) -> int:
  return max(least, 1 << (max(n, 1) - 1).bit_length())


def pick(logits, key, s: Sampling):
  """Next token ids from logits [B, V] under the sampling settings."""
  if s.temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    ordered = jnp.sort(logits, -1)[..., ::-1]
    probs = jax.nn.softmax(ordered, -1)
    keep = jnp.cumsum(probs, -1) - probs < s.top_p           # always keeps the best token
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def _gate(setup: engine.Setup, mode: str, segment_ids, row_sources, exclude):
  if setup.spec is None:
    return None
  return sinks.make_gate(setup.spec, mode, segment_ids=segment_ids, row_sources=row_sources,
                         exclude=exclude, max_docs=1)


def _positions(valid):
  return jnp.maximum(jnp.cumsum(valid, 1) - 1, 0).astype(jnp.int32)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sample(setup, mode: str, s: Sampling, use_cache: bool, params, tokens, valid, row_sources,
            exclude, key, eos):
  b, tp = tokens.shape
  total = tp + s.max_new
  keys = jax.random.split(key, s.max_new)
  valid_all = jnp.zeros((b, total), bool).at[:, :tp].set(valid)
  run = lambda batch, seg, cache=None: transformer.apply(
      setup.graphdef, params, batch, _gate(setup, mode, seg, row_sources, exclude), cache)

  if use_cache:
    cache = transformer.empty_cache(setup.dims, b, total)._replace(valid=valid_all)
    seg = valid.astype(jnp.int32)
    logits, cache = run({"tokens": tokens, "positions": _positions(valid), "segment_ids": seg},
                        seg, cache)
    ones = jnp.ones((b, 1), jnp.int32)

    def step(carry, key):
      cache, last, count, done = carry
      token = jnp.where(done, tok_lib.PAD, pick(last, key, s))
      cache = cache._replace(valid=jax.lax.dynamic_update_slice(
          cache.valid, jnp.ones((b, 1), bool), (0, cache.index)))
      logits, cache = run({"tokens": token[:, None], "positions": count[:, None],
                           "segment_ids": ones}, ones, cache)
      return (cache, logits[:, -1], count + 1, done | (token == eos)), token

    carry = (cache, logits[:, -1], valid.sum(1).astype(jnp.int32), jnp.zeros(b, bool))
    _, out = jax.lax.scan(step, carry, keys)
    return out.T

  buffer = jnp.zeros((b, total), jnp.int32).at[:, :tp].set(tokens)

  def step(carry, xs):   # the whole sequence again every step: the no-cache baseline
    buffer, valid, done = carry
    n, key = xs
    seg = valid.astype(jnp.int32)
    logits = run({"tokens": buffer, "positions": _positions(valid), "segment_ids": seg}, seg)
    token = jnp.where(done, tok_lib.PAD, pick(logits[:, tp - 1 + n], key, s))
    buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, tp + n))
    valid = jax.lax.dynamic_update_slice(valid, jnp.ones((b, 1), bool), (0, tp + n))
    return (buffer, valid, done | (token == eos)), token

  _, out = jax.lax.scan(step, (buffer, valid_all, jnp.zeros(b, bool)),
                        (jnp.arange(s.max_new), keys))
  return out.T


def sample(setup: engine.Setup, params, prompts: list[list[int]], row_sources, exclude,
           s: Sampling = Sampling(), mode: str = "source", seed: int = 0,
           use_cache: bool = True, eos: int = tok_lib.EOS) -> list[list[int]]:
  """New tokens for each prompt (token ids, BOS included), cut after the `eos` id."""
  b, tp = bucket(len(prompts), 1), bucket(max(len(p) for p in prompts))
  tokens, valid = np.zeros((b, tp), np.int32), np.zeros((b, tp), bool)
  for i, p in enumerate(prompts):
    tokens[i, tp - len(p):], valid[i, tp - len(p):] = p, True
  rows = np.zeros(b, np.int32)
  rows[:len(prompts)] = row_sources
  out = np.asarray(_sample(setup, mode, s, use_cache, params, tokens, valid, rows, exclude,
                           jax.random.key(seed), np.int32(eos)))
  return [row[:row.index(eos) + 1] if eos in row else row for row in out[:len(prompts)].tolist()]


@partial(jax.jit, static_argnums=(0, 1))
def _score(setup, mode: str, params, batch, exclude):
  nll, _ = engine.token_losses(setup, params, batch, mode, exclude)
  return -nll.sum(1)


@partial(jax.jit, static_argnums=(0, 1))
def _token_stats(setup, mode: str, params, batch, exclude):
  """Per target token: log p(target), and the mean and std of log p(v) under the model's own
  distribution (what Min-K%++ normalises by)."""
  logp = jax.nn.log_softmax(engine.logits_in_mode(setup, params, batch, mode, exclude), -1)
  target = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  p = jnp.exp(logp)
  mu = (p * logp).sum(-1)
  sigma = jnp.sqrt(jnp.maximum((p * logp ** 2).sum(-1) - mu ** 2, 1e-12))
  return target, mu, sigma


def token_stats(setup: engine.Setup, params, documents: list[list[int]], row_sources, exclude,
                mode: str = "source", batch_size: int = 32) -> list[dict]:
  """For each document (token ids, BOS first): per-token log p, mu and sigma of its targets."""
  n = len(documents)
  rows = answer_rows([[d[0]] for d in documents], [list(d[1:]) for d in documents], row_sources,
               batch_size)
  out = []
  for start, batch in rows:
    got = [np.asarray(x) for x in _token_stats(setup, mode, params, batch, exclude)]
    for r in range(min(n, start + batch_size) - start):
      keep = batch["loss_mask"][r].astype(bool)
      out.append({"logp": got[0][r][keep], "mu": got[1][r][keep], "sigma": got[2][r][keep]})
  return out


def answer_rows(prompts, answers, row_sources, batch_size: int):
  """(start, batch) of fixed-shape rows: prompt + answer, the loss on the answer only."""
  n = len(prompts)
  length = bucket(max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True)))
  for start in range(0, n, batch_size):
    batch = {f: np.zeros((batch_size, length), np.int32) for f in
             ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
    rows = np.zeros(batch_size, np.int32)
    for r, i in enumerate(range(start, min(n, start + batch_size))):
      seq = list(prompts[i]) + list(answers[i])
      batch["tokens"][r, :len(seq)] = seq
      batch["targets"][r, :len(seq) - 1] = seq[1:]
      batch["loss_mask"][r, len(prompts[i]) - 1:len(seq) - 1] = 1
      batch["positions"][r, :len(seq)] = np.arange(len(seq))
      batch["segment_ids"][r, :len(seq)] = 1
      rows[r] = row_sources[i]
    batch["source_ids"] = batch["segment_ids"] * rows[:, None]
    batch["row_sources"] = rows
    yield start, batch


def score(setup: engine.Setup, params, prompts: list[list[int]], answers: list[list[int]],
          row_sources, exclude, mode: str = "source", batch_size: int = 32) -> np.ndarray:
  """log p(answer | prompt) summed over the answer's tokens, per item, in a sink mode
  ("source" with `row_sources`, "backbone", or "dense" for the control)."""
  n = len(prompts)
  out = np.zeros(n)
  for start, batch in answer_rows(prompts, answers, row_sources, batch_size):
    got = np.asarray(_score(setup, mode, params, batch, exclude))
    out[start:start + batch_size] = got[:min(n, start + batch_size) - start]
  return out
