"""Sampling with a KV cache, and scoring answers, under any sink mode (pure, jitted).

Prompts are left-padded to a common length so every row's last prompt token sits in the
same column; pads are invisible to attention and positions count real tokens only. A row's
sinks come from `row_sources` (mode "source": a source id per row, 0 = none) or are all off
(mode "backbone"); `exclude` zeroes unlearned units in every pass. Every row has its own
temperature, top-p, seed, token limit and end token, so one batch serves requests of different
settings. Decoding runs in chunks of steps (a jitted scan each) so a server can stream and
stop when every row has ended. Shapes are bucketed so a session compiles a handful of
functions, not one per prompt.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sinkformer import engine
from sinkformer.data import tokenizer as tok_lib
from sinkformer.model import sinks, transformer


@dataclasses.dataclass(frozen=True)
class Sampling:
  """One setting for every row (the CLI, the evaluation); the server sets rows apart."""
  max_new: int = 32
  temperature: float = 0.0   # 0: greedy
  top_k: int = 0             # 0: no top-k filter
  top_p: float = 1.0         # 1: no nucleus filter


class Rows(NamedTuple):
  """Per-row sampling (an ordinary jit argument: rows of different requests share a batch)."""
  temperature: jax.Array   # f32[B]; 0: greedy
  top_p: jax.Array         # f32[B]; 1: no nucleus filter
  seed: jax.Array          # uint32[B]
  limit: jax.Array         # int32[B]: new tokens the row may have
  eos: jax.Array           # int32[B]: the token that ends the row (-1: none, it runs to its limit)

  @classmethod
  def uniform(cls, n: int, s: Sampling, seed: int = 0, eos: int = tok_lib.EOS) -> Rows:
    """`n` rows of one setting; row r samples from seed + r."""
    return cls(np.full(n, s.temperature, np.float32), np.full(n, s.top_p, np.float32),
               (seed + np.arange(n)).astype(np.uint32), np.full(n, s.max_new, np.int32),
               np.full(n, eos, np.int32))


def bucket(n: int, least: int = 16) -> int:
  return max(least, 1 << (max(n, 1) - 1).bit_length())


def pick(logits, keys, temperature, top_p, top_k: int = 0, vocab: int | None = None):
  """Next token ids from logits [B, V]: greedy where temperature is 0, else sampled from the
  tempered distribution cut to the `top_k` best (static; 0 = all) and to the smallest set
  of mass >= top_p (per row; the best token is always kept). Ids from `vocab` on (the
  tokenizer's size, when the model's is larger) are never picked."""
  if vocab is not None and vocab < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
  greedy = jnp.argmax(logits, -1).astype(jnp.int32)

  def sampled(logits):
    logits = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    ordered = jnp.sort(logits, -1)[..., ::-1]
    probs = jax.nn.softmax(ordered, -1)
    keep = jnp.cumsum(probs, -1) - probs < top_p[:, None]
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

  # an all-greedy batch skips the sort over the vocabulary
  drawn = jax.lax.cond((temperature > 0).any(), sampled, lambda _: greedy, logits)
  return jnp.where(temperature > 0, drawn, greedy)


def _step_keys(seed, step):
  """Row r's key for its `step`-th new token: a function of its own seed only."""
  step = jnp.broadcast_to(step, seed.shape)
  return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)


def _gate(setup: engine.Setup, mode: str, segment_ids, row_sources, exclude):
  if setup.spec is None:
    return None
  return sinks.make_gate(setup.spec, mode, segment_ids=segment_ids, row_sources=row_sources,
                         exclude=exclude, max_docs=1)


def _positions(valid):
  return jnp.maximum(jnp.cumsum(valid, 1) - 1, 0).astype(jnp.int32)


def _run(setup, mode, params, row_sources, exclude, batch, cache=None):
  gate = _gate(setup, mode, batch["segment_ids"], row_sources, exclude)
  return transformer.apply(setup.graphdef, params, batch, gate, cache)


class Decoding(NamedTuple):
  """Where decoding stands between chunks."""
  cache: transformer.Cache
  last: jax.Array    # f32[B, V] logits of each row's latest token
  count: jax.Array   # int32[B] tokens so far (the next position)
  new: jax.Array     # int32[B] tokens generated so far
  done: jax.Array    # bool[B]


@partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill(setup, mode: str, total: int, params, tokens, valid, row_sources, exclude):
  b, tp = tokens.shape
  cache = transformer.empty_cache(setup.dims, b, total)._replace(
      valid=jnp.zeros((b, total), bool).at[:, :tp].set(valid))
  seg = valid.astype(jnp.int32)
  logits, cache = _run(setup, mode, params, row_sources, exclude,
                       {"tokens": tokens, "positions": _positions(valid), "segment_ids": seg},
                       cache)
  zeros = jnp.zeros(b, jnp.int32)
  return Decoding(cache, logits[:, -1], valid.sum(1).astype(jnp.int32), zeros, zeros > 0)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))
def _decode_chunk(setup, mode: str, steps: int, top_k: int, vocab: int | None, params, state,
                  row_sources, exclude, rows):
  """`steps` tokens for every row (PAD once a row is done: its EOS or its limit reached)."""
  b = state.count.shape[0]
  ones = jnp.ones((b, 1), jnp.int32)

  def step(state, _):
    done = state.done | (state.new >= rows.limit)
    token = pick(state.last, _step_keys(rows.seed, state.new), rows.temperature, rows.top_p,
                 top_k, vocab)
    token = jnp.where(done, tok_lib.PAD, token)
    cache = state.cache._replace(valid=jax.lax.dynamic_update_slice(
        state.cache.valid, jnp.ones((b, 1), bool), (0, state.cache.index)))
    logits, cache = _run(setup, mode, params, row_sources, exclude,
                         {"tokens": token[:, None], "positions": state.count[:, None],
                          "segment_ids": ones}, cache)
    live = ~done
    return Decoding(cache, logits[:, -1], state.count + live, state.new + live,
                    done | (token == rows.eos)), token

  state, out = jax.lax.scan(step, state, None, length=steps)
  return state, out.T


class Decoder:
  """Generation for a batch of prompts (token ids, BOS first) with a KV cache, `chunk` steps
  per `next()`, which returns each row's new tokens so far (a row ends after its EOS or at
  its limit). Between chunks the caller may change `exclude` (same shapes: no recompile)
  and `stop` rows. Shapes are bucketed (rows, prompt length, and the cache's room for new
  tokens: `room`, or the longest limit rounded up to a power of two), so a session compiles
  a handful of functions; a server fixes `room` to its largest max_tokens so that requests'
  limits never change a shape."""

  def __init__(self, setup: engine.Setup, params, prompts: list[list[int]], row_sources,
               exclude, rows: Rows, mode: str = "source", top_k: int = 0, chunk: int = 16,
               vocab: int | None = None, room: int | None = None):
    self.n = len(prompts)
    tokens, valid = _left_padded(prompts)
    b, tp = tokens.shape
    self.steps = -(-int(max(rows.limit)) // chunk) * chunk
    pad = lambda x, dtype: np.concatenate([np.asarray(x, dtype), np.zeros(b - self.n, dtype)])
    self.sources = pad(row_sources, np.int32)
    self.rows = Rows(pad(rows.temperature, np.float32),
                     pad(rows.top_p, np.float32) + (np.arange(b) >= self.n),
                     pad(rows.seed, np.uint32), pad(rows.limit, np.int32),
                     pad(rows.eos, np.int32) - (np.arange(b) >= self.n))
    room = bucket(self.steps, chunk) if room is None else max(room, self.steps)
    self.setup, self.params, self.exclude, self.mode = setup, params, exclude, mode
    self.top_k, self.chunk, self.vocab = top_k, chunk, vocab
    self.state = _prefill(setup, mode, tp + room, params, tokens, valid, self.sources, exclude)
    self.out = np.zeros((b, 0), np.int32)
    self.ended = False

  def stop(self, rows):
    """End these rows now: they generate nothing more."""
    done = np.asarray(self.state.done).copy()
    done[list(rows)] = True
    self.state = self.state._replace(done=jnp.asarray(done))

  def done_rows(self) -> np.ndarray:
    """bool per prompt: the row has ended (EOS, its limit, or stopped)."""
    return np.asarray(self.state.done | (self.state.new >= self.rows.limit))[:self.n]

  def next(self) -> list[list[int]]:
    self.state, got = _decode_chunk(self.setup, self.mode, self.chunk, self.top_k, self.vocab,
                                    self.params, self.state, self.sources, self.exclude,
                                    self.rows)
    self.out = np.concatenate([self.out, np.asarray(got)], 1)
    done = np.asarray(self.state.done | (self.state.new >= self.rows.limit))
    self.ended = bool(done.all()) or self.out.shape[1] >= self.steps
    return [_cut(row, int(eos), int(limit)) for row, eos, limit in
            zip(self.out[:self.n].tolist(), self.rows.eos[:self.n], self.rows.limit[:self.n])]


def decode(setup: engine.Setup, params, prompts: list[list[int]], row_sources, exclude,
           rows: Rows, mode: str = "source", top_k: int = 0, chunk: int = 16,
           vocab: int | None = None, room: int | None = None):
  """Every row's new tokens so far after each chunk, until every row has ended (a Decoder
  left to run)."""
  decoder = Decoder(setup, params, prompts, row_sources, exclude, rows, mode, top_k, chunk,
                    vocab, room)
  while not decoder.ended:
    yield decoder.next()


def _left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, valid) [B, Tp]: prompts right-aligned, rows and length bucketed."""
  b, tp = bucket(len(prompts), 1), bucket(max(len(p) for p in prompts))
  tokens, valid = np.zeros((b, tp), np.int32), np.zeros((b, tp), bool)
  for i, p in enumerate(prompts):
    tokens[i, tp - len(p):], valid[i, tp - len(p):] = p, True
  return tokens, valid


def _cut(row: list[int], eos: int, limit: int) -> list[int]:
  row = row[:limit]
  return row[:row.index(eos) + 1] if eos in row else row


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _sample_without_cache(setup, mode: str, steps: int, top_k: int, vocab: int | None, params,
                          tokens, valid, row_sources, exclude, rows):
  """The whole sequence again at every step: the baseline the KV cache is measured against."""
  b, tp = tokens.shape
  buffer = jnp.zeros((b, tp + steps), jnp.int32).at[:, :tp].set(tokens)
  valid = jnp.zeros((b, tp + steps), bool).at[:, :tp].set(valid)

  def step(carry, n):
    buffer, valid, done = carry
    seg = valid.astype(jnp.int32)
    logits = _run(setup, mode, params, row_sources, exclude,
                  {"tokens": buffer, "positions": _positions(valid), "segment_ids": seg})
    token = pick(logits[:, tp - 1 + n], _step_keys(rows.seed, n), rows.temperature, rows.top_p,
                 top_k, vocab)
    token = jnp.where(done | (n >= rows.limit), tok_lib.PAD, token)
    buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, tp + n))
    valid = jax.lax.dynamic_update_slice(valid, jnp.ones((b, 1), bool), (0, tp + n))
    return (buffer, valid, done | (token == rows.eos)), token

  _, out = jax.lax.scan(step, (buffer, valid, jnp.zeros(b, bool)), jnp.arange(steps))
  return out.T


def sample(setup: engine.Setup, params, prompts: list[list[int]], row_sources, exclude,
           s: Sampling = Sampling(), mode: str = "source", seed: int = 0,
           use_cache: bool = True, eos: int = tok_lib.EOS,
           vocab: int | None = None) -> list[list[int]]:
  """New tokens for each prompt (token ids, BOS included), cut after the `eos` id; every row
  with the settings `s` (row r sampling from seed + r)."""
  rows = Rows.uniform(len(prompts), s, seed, eos)
  if use_cache:
    *_, last = decode(setup, params, prompts, row_sources, exclude, rows, mode, s.top_k,
                      min(16, s.max_new), vocab)
    return last
  tokens, valid = _left_padded(prompts)
  b = tokens.shape[0]
  sources = np.zeros(b, np.int32)
  sources[:len(prompts)] = row_sources
  padded = Rows.uniform(b, s, seed, eos)
  out = np.asarray(_sample_without_cache(setup, mode, s.max_new, s.top_k, vocab, params, tokens,
                                         valid, sources, exclude, padded))
  return [_cut(row, eos, s.max_new) for row in out[:len(prompts)].tolist()]


@partial(jax.jit, static_argnums=(0, 1))
def _score(setup, mode: str, params, batch, exclude):
  nll, _ = engine.token_losses(setup, params, batch, mode, exclude)
  return -nll.sum(1)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _top_logprobs(setup, mode: str, k: int, params, batch, exclude):
  """Per target token: log p(target) and the k most likely tokens' log p and ids."""
  logp = jax.nn.log_softmax(engine.logits_in_mode(setup, params, batch, mode, exclude), -1)
  target = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  values, ids = jax.lax.top_k(logp, max(k, 1))
  return target, values, ids


def token_logprobs(setup: engine.Setup, params, sequences: list[list[int]], row_sources,
                   exclude, mode: str = "source", k: int = 0,
                   batch_size: int = 32) -> list[dict]:
  """For each sequence (token ids, BOS first): the log-probability of every token after the
  first given those before it, and the `k` most likely tokens there (ids and log p)."""
  n = len(sequences)
  out = []
  for start, batch in answer_rows([s[:1] for s in sequences], [list(s[1:]) for s in sequences],
                                  row_sources, batch_size):
    target, values, ids = (np.asarray(x) for x in _top_logprobs(setup, mode, k, params, batch,
                                                                 exclude))
    for r in range(min(n, start + batch_size) - start):
      keep = batch["loss_mask"][r].astype(bool)
      out.append({"logp": target[r][keep], "top_logp": values[r][keep][:, :k],
                  "top_ids": ids[r][keep][:, :k]})
  return out


@partial(jax.jit, static_argnums=(0, 1))
def _token_stats(setup, mode: str, params, batch, exclude):
  """Per target token: log p(target), the mean and std of log p(v) under the model's own
  distribution (what Min-K%++ normalises by), and the teacher-forced argmax."""
  logp = jax.nn.log_softmax(engine.logits_in_mode(setup, params, batch, mode, exclude), -1)
  target = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  p = jnp.exp(logp)
  mu = (p * logp).sum(-1)
  sigma = jnp.sqrt(jnp.maximum((p * logp ** 2).sum(-1) - mu ** 2, 1e-12))
  return target, mu, sigma, jnp.argmax(logp, -1)


def token_stats(setup: engine.Setup, params, documents: list[list[int]], row_sources, exclude,
                mode: str = "source", batch_size: int = 32) -> list[dict]:
  """For each document (token ids, BOS first): per target token log p, mu, sigma (Min-K%++)
  and the teacher-forced argmax."""
  n = len(documents)
  rows = answer_rows([[d[0]] for d in documents], [list(d[1:]) for d in documents], row_sources,
               batch_size)
  out = []
  for start, batch in rows:
    got = [np.asarray(x) for x in _token_stats(setup, mode, params, batch, exclude)]
    for r in range(min(n, start + batch_size) - start):
      keep = batch["loss_mask"][r].astype(bool)
      out.append({"logp": got[0][r][keep], "mu": got[1][r][keep], "sigma": got[2][r][keep],
                  "argmax": got[3][r][keep]})
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
