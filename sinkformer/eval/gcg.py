"""Greedy coordinate gradient (GCG, Zou et al. 2023) search for the shortest prompt that makes
a model emit a target passage, scored by the adversarial compression ratio (ACR = target
tokens / prompt tokens, Schwarzschild et al. 2024): ACR > 1 means the model stores the passage
more compactly than it is written, i.e. has memorised it.

A prompt is `length` free tokens after BOS, started from random tokens or, with `init =
"prefix"`, from the `length` tokens that precede the target in its document (what an attacker
with a copy of the source's opening would try first; any prompt found is still a valid
bound, the start only decides how much of the budget the search needs). It succeeds when greedy decoding reproduces the
whole target, which is exactly "the teacher-forced argmax equals the target at every
position", so one forward pass checks it. Each iteration: the gradient of the target's NLL
with respect to the one-hot prompt ranks `top_k` substitutions per position; `candidates`
single-token swaps drawn from them (plus the current prompt) are scored in one batch; the
best one, a successful one first, becomes the prompt. Lengths are tried shortest first and a
target's search stops at its first success, so ACR is a lower bound at the budget's
resolution. Special tokens (ids 0-3) are never proposed.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sinkformer import engine

FIRST_FREE = 4   # ids below are pad/unk/bos/eos (or the built-in corpus' specials)


@dataclasses.dataclass(frozen=True)
class Budget:
  lengths: tuple[int, ...]   # prompt lengths tried, shortest first
  steps: int                 # iterations per length
  top_k: int                 # substitutions per position taken from the gradient
  candidates: int            # swaps scored per iteration
  init: str                  # "prefix" (the text before the target) or "random"

  @classmethod
  def from_config(cls, g) -> Budget:
    return cls(tuple(int(x) for x in g.lengths), int(g.steps), int(g.top_k), int(g.candidates),
               g.init)


def _rows(prompts, target, bos: int, row_source):
  """Packed-row batch of [BOS, prompt, target] per prompt, the loss on the target only."""
  b, length = prompts.shape
  seq = jnp.concatenate([jnp.full((b, 1), bos, jnp.int32), prompts,
                         jnp.broadcast_to(target, (b, target.shape[0]))], 1)
  n = seq.shape[1]
  ones = jnp.ones((b, n), jnp.int32)
  scored = (jnp.arange(n) >= length) & (jnp.arange(n) < n - 1)   # predicts target[0..T-1]
  return {"tokens": seq, "targets": jnp.concatenate([seq[:, 1:], seq[:, :1]], 1),
          "loss_mask": jnp.broadcast_to(scored, (b, n)).astype(jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
          "segment_ids": ones, "source_ids": ones * row_source,
          "row_sources": jnp.full((b,), row_source, jnp.int32)}


def _losses(setup, mode, params, batch, exclude):
  """(mean target NLL, greedy reproduces the target) per row."""
  logits = engine.logits_in_mode(setup, params, batch, mode, exclude)
  mask = batch["loss_mask"].astype(bool)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1)[..., 0]
  hit = jnp.where(mask, jnp.argmax(logits, -1) == batch["targets"], True).all(-1)
  return jnp.where(mask, nll, 0).sum(-1) / mask.sum(-1), hit


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _step(setup, mode: str, budget: Budget, bos: int, params, prompt, target, row_source,
          exclude, key):
  """One GCG iteration on prompt int32[L]: (next prompt, its loss, whether it succeeds)."""
  vocab = setup.dims.vocab_size
  table = params["embed"]["embedding"]

  def loss_of(onehot):
    batch = _rows(prompt[None], target, bos, row_source)
    full = jax.nn.one_hot(batch["tokens"], vocab).at[0, 1:1 + prompt.shape[0]].set(onehot)
    return _losses(setup, mode, params, {**batch, "embeds": full @ table}, exclude)[0][0]

  grad = jax.grad(loss_of)(jax.nn.one_hot(prompt, vocab))            # [L, V]
  grad = grad.at[:, :FIRST_FREE].set(jnp.inf)
  top = jax.lax.top_k(-grad, budget.top_k)[1]                          # [L, top_k]
  k_pos, k_tok = jax.random.split(key)
  where = jax.random.randint(k_pos, (budget.candidates,), 0, prompt.shape[0])
  pick = jax.random.randint(k_tok, (budget.candidates,), 0, budget.top_k)
  swaps = jnp.tile(prompt, (budget.candidates, 1)).at[
      jnp.arange(budget.candidates), where].set(top[where, pick])
  candidates = jnp.concatenate([prompt[None], swaps])
  loss, hit = _losses(setup, mode, params, _rows(candidates, target, bos, row_source), exclude)
  best = jnp.argmin(jnp.where(hit, -jnp.inf, loss))
  return candidates[best], loss[best], hit[best]


def shortest_prompt(setup, params, target: list[int], context: list[int], row_source: int,
                    exclude, mode: str, budget: Budget, bos: int, seed: int = 0) -> dict:
  """Search each prompt length in turn; {"prompt_tokens": L or None, "prompt": ids, "loss"}.
  `context`: the tokens before the target (the "prefix" start; at least max(lengths))."""
  target_arr = jnp.asarray(target, jnp.int32)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  best = {"prompt_tokens": None, "prompt": [], "loss": float("inf")}
  for length in budget.lengths:
    start = (context[len(context) - length:] if budget.init == "prefix"
             else rng.integers(FIRST_FREE, setup.dims.vocab_size, length))
    prompt = jnp.asarray(start, jnp.int32)
    for _ in range(budget.steps):
      key, sub = jax.random.split(key)
      prompt, loss, hit = _step(setup, mode, budget, bos, params, prompt, target_arr,
                                np.int32(row_source), exclude, sub)
      if bool(hit):
        return {"prompt_tokens": length, "prompt": np.asarray(prompt).tolist(),
                "loss": float(loss)}
    if float(loss) < best["loss"]:
      best = {"prompt_tokens": None, "prompt": np.asarray(prompt).tolist(), "loss": float(loss)}
  return best
