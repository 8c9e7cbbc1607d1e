"""A trained run, loaded for inference: generation and scoring in every mode, never serving
an unlearned source.

Modes: `source:REF` (sink-on: that source's sinks), `route` (sink-off
as deployed: the nearest surviving source's sinks), `backbone` (no sinks), `placebo` (the
farthest surviving source's sinks). Policies: `exclude` zeroes every unlearned source's units
in every forward pass (an in-graph bit mask, updated in place as requests land); `route`
only never activates unlearned sources. Every result records its mode, source and policy.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sinkformer import config as config_lib, storage

from sinkformer.data import pipeline, synthetic, tokenizer as tok_lib
from sinkformer.errors import UserError
from sinkformer.model import sinks, transformer
from sinkformer.run import directory, switchboard
from sinkformer.serve import generate

OPENING = 64   # tokens of a source's first document that its router embedding reads


class Excluder:
  """The union of unlearned sources' units: O(new sources) per addition."""

  def __init__(self, spec: sinks.SinkSpec):
    self.spec = spec
    self._masks = jax.jit(lambda ids: sinks.exclusion(spec, ids))
    self.mlp = np.zeros((spec.mask_layers, spec.mlp.size), bool)
    self.attn = np.zeros((spec.mask_layers, spec.attn.size), bool) if spec.attn else None

  def clear(self):
    self.mlp[:] = False
    if self.attn is not None:
      self.attn[:] = False

  def add(self, ids):
    ids = list(ids)
    for start in range(0, len(ids), 4096):
      part = ids[start:start + 4096]
      padded = np.zeros(max(8, 1 << (len(part) - 1).bit_length()), np.int32)  # few shapes
      padded[:len(part)] = part
      got = self._masks(padded)
      self.mlp |= np.asarray(got.mlp)
      if self.attn is not None:
        self.attn |= np.asarray(got.attn)

  def exclusion(self, policy: str) -> sinks.Exclusion:
    if policy == "route":   # nothing zeroed; unlearned sources are just never chosen
      return sinks.Exclusion(np.zeros_like(self.mlp),
                             None if self.attn is None else np.zeros_like(self.attn))
    return sinks.Exclusion(self.mlp.copy(), None if self.attn is None else self.attn.copy())


def run_tokenizer(cfg, identity: dict):
  """The tokenizer a run was trained with: the built-in words or its corpus' SentencePiece."""
  if identity.get("corpus") == "builtin":
    return synthetic.Words(cfg.data.facts_per_source)
  return tok_lib.load(os.path.join(storage.local_prepared(identity["corpora"][0]["path"]),
                                   "tokenizer.model"))


def source_openings(data: pipeline.Data, ids) -> list[np.ndarray]:
  """The first OPENING tokens of each trained source's first training document (`data`: the
  run's, from pipeline.load)."""
  ids = np.asarray(ids)
  out = [None] * len(ids)
  for stream in data.train.streams:
    index = np.flatnonzero(stream.keep)
    sources, first = np.unique(stream.docs.source_ids[index], return_index=True)
    at = np.minimum(np.searchsorted(sources, ids), len(sources) - 1)
    found = np.flatnonzero((sources[at] == ids) & np.asarray([o is None for o in out]))
    for position, tokens in zip(found, stream.docs.read(index[first[at[found]]])):
      out[position] = tokens[:OPENING]
  missing = [int(i) for i, o in zip(ids, out) if o is None]
  if missing:
    raise UserError(f"source(s) {missing[:10]} have no training document")
  return out




class Router:
  """Cosine nearest surviving source. A source's vector: backbone-mode mean-pooled final
  hidden states of its title, plus (default, `unlearn.router = "title+opening"`) those of its
  first document's opening, normalised; stored with the run (`router.npz`, rebuilt when the
  checkpoint or the choice changes). Queries are embedded the same way."""

  def __init__(self, ids: np.ndarray, vectors: np.ndarray):
    self.ids, self.vectors = ids, jnp.asarray(vectors)

  @staticmethod
  def embed(setup, params, token_lists, batch_size: int = 64) -> np.ndarray:
    length = generate.bucket(max(len(t) for t in token_lists))
    batch_size = min(batch_size, generate.bucket(len(token_lists), 1))   # a query: one row
    out = []
    for start in range(0, len(token_lists), batch_size):
      chunk = token_lists[start:start + batch_size]
      tokens = np.zeros((batch_size, length), np.int32)
      seg = np.zeros((batch_size, length), np.int32)
      for r, t in enumerate(chunk):
        tokens[r, :len(t)], seg[r, :len(t)] = t, 1
      out.append(np.asarray(_mean_features(setup, params, tokens, seg))[:len(chunk)])
    vectors = np.concatenate(out)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)

  def rank(self, queries: np.ndarray, alive: np.ndarray, farthest: bool = False) -> np.ndarray:
    """The best surviving source id per query (the worst, for the placebo)."""
    best = _best(self.vectors, jnp.asarray(queries), jnp.asarray(alive), -1.0 if farthest else 1.0)
    return self.ids[np.asarray(best)]


@jax.jit
def _best(vectors, queries, alive, sign):
  """argmax over surviving sources of sign * cosine (vectors and queries are unit length)."""
  scores = sign * (queries @ vectors.T)
  return jnp.argmax(jnp.where(alive[None, :], scores, -jnp.inf), axis=1)


def _mean_features_impl(setup, params, tokens, seg):
  gate = None if setup.spec is None else sinks.make_gate(setup.spec, "backbone",
                                                         segment_ids=seg, max_docs=1)
  batch = {"tokens": tokens, "positions": jnp.maximum(jnp.cumsum(seg, 1) - 1, 0),
           "segment_ids": seg}
  x = transformer.features(setup.graphdef, params, batch, gate).astype(jnp.float32)
  w = seg[..., None].astype(jnp.float32)
  return (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


_mean_features = jax.jit(_mean_features_impl, static_argnums=0)


def named_source(board: switchboard.Switchboard, mode: str) -> int:
  """The source id a serving mode names (0 for route, placebo and backbone); refuses a
  malformed mode and an unlearned, ambiguous or unknown source."""
  if mode in ("route", "placebo", "backbone"):
    return 0
  if not mode.startswith("source:"):
    raise UserError(f"unknown mode {mode[:100]!r}: route, source:KEY, backbone or placebo")
  return board.active(mode.split(":", 1)[1])["id"]


class Server:
  """One run on one device: its newest checkpoint (or `step`), tokenizer, switchboard,
  exclusion mask and router."""

  def __init__(self, run_dir: str, step: int | None = None, policy: str | None = None,
               router_text: str | None = None):
    run = directory.load_run(run_dir, step)
    self.run_dir, self.cfg, self.setup, self.step = run_dir, run.cfg, run.setup, run.step
    self.policy = policy or self.cfg.unlearn.policy
    self.router_text = router_text or self.cfg.unlearn.router
    if self.router_text not in config_lib.ROUTER_TEXTS:
      raise UserError(f"unknown router text {self.router_text!r}; expected one of "
                      f"{config_lib.ROUTER_TEXTS}")
    if self.policy not in config_lib.POLICIES:
      raise UserError(f"unknown policy {self.policy!r}; expected one of {config_lib.POLICIES}")
    self.params, self.identity = run.params, run.identity
    self.tokenizer = run_tokenizer(self.cfg, self.identity)
    self.board = switchboard.Switchboard(run_dir)
    self.excluder = Excluder(self.setup.spec) if self.setup.spec else None
    self.seq, self.unlearned = 0, set()   # the ledger as folded in: its position, the result
    self._router = None
    self.refresh()

  @property
  def router(self) -> Router:
    if self._router is None:
      path = os.path.join(self.run_dir, "router.npz")
      saved = np.load(path) if os.path.exists(path) else None
      if saved is not None and (int(saved["step"]), str(saved.get("text")),
                                str(saved.get("candidates"))) == (self.step, self.router_text,
                                                                  "trained"):
        self._router = Router(saved["ids"], saved["vectors"])
      else:   # candidates: the sources trained on (held-out sinks never learned anything)
        data = pipeline.load(directory.trained_config(self.run_dir)[0], log=lambda *_: None)
        trained = set(data.trained_sources().tolist())
        rows = [r for r in self.board.page(None, 0, 2**31) if r["id"] in trained]
        ids = np.asarray([r["id"] for r in rows], np.int32)
        vectors = Router.embed(self.setup, self.params, [self.encode(r["title"]) for r in rows])
        if self.router_text == "title+opening":
          openings = source_openings(data, ids)
          vectors = vectors + Router.embed(self.setup, self.params, [list(o) for o in openings])
          vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        np.savez(path, ids=ids, vectors=vectors, step=self.step, text=self.router_text,
                 candidates="trained")
        self._router = Router(ids, vectors)
    return self._router

  def alive(self) -> np.ndarray:
    """bool per router source: not unlearned (vectorised: the router may hold millions)."""
    return ~np.isin(self.router.ids, np.fromiter(self.unlearned, np.int64, len(self.unlearned)))

  def encode(self, text: str) -> list[int]:
    return [self.tokenizer.bos, *self.tokenizer.encode(text)]

  def sources_for(self, texts: list[str], mode: str) -> tuple[np.ndarray, str]:
    """(row source ids, gate mode) for a serving mode; refuses unlearned sources before
    anything else."""
    self.refresh()
    named = named_source(self.board, mode)
    if self.setup.spec is None:   # the dense control: no sinks, but the same refusals
      return np.zeros(len(texts), np.int32), "dense"
    if mode in ("route", "placebo"):
      return self.route(texts, farthest=mode == "placebo"), "source"
    return np.full(len(texts), named, np.int32), "source" if named else "backbone"

  def route(self, texts: list[str], farthest: bool = False) -> np.ndarray:
    """The nearest surviving source per text (the farthest, for the placebo)."""
    alive = self.alive()
    if not alive.any():
      raise UserError("every source of this run is unlearned: nothing to route to (use "
                      "mode backbone)")
    queries = Router.embed(self.setup, self.params, [self.encode(t) for t in texts])
    return self.router.rank(queries, alive, farthest).astype(np.int32)

  def refresh(self) -> set[int]:
    """Fold in the ledger entries committed since the last call (by any process); returns
    the sources they unlearned. Costs one read of SQLite's shared memory when nothing
    changed."""
    if not self.board.changed():
      return set()
    events, seq = self.board.events_since(self.seq)
    new = {i for action, i in events if action == "unlearn"}
    if any(action == "reactivate" for action, _ in events):
      self.unlearned = set(self.board.unlearned_ids())
      if self.excluder:
        self.excluder.clear()
        self.excluder.add(sorted(self.unlearned))
    else:
      self.unlearned |= new
      if self.excluder:
        self.excluder.add(sorted(new))
    self.seq = seq
    return new

  def exclusion(self):
    return self.excluder.exclusion(self.policy) if self.excluder else None

  def check_fits(self, longest: int):
    """Refuses a prompt of `longest` tokens that leaves no room in the model's context."""
    context = self.cfg.data.seq_len
    if longest >= context:   # BOS takes one place of the context the model was trained on
      raise UserError(f"a prompt of {longest} tokens does not fit: the model's context is "
                      f"{context} tokens with BOS; shorten it to at most {context - 1}")

  def generate(self, texts: list[str], mode: str = "route",
               sampling: generate.Sampling = generate.Sampling(), seed: int = 0,
               use_cache: bool = True) -> list[dict]:
    if not texts or any(not t.strip() for t in texts):
      raise UserError("give a prompt with text (--prompt 'TEXT'): the model continues it, and "
                      "route mode picks the source from it")
    sources, gate_mode = self.sources_for(texts, mode)   # an unlearned source: refused first
    prompts = [self.encode(t) for t in texts]
    self.check_fits(max(map(len, prompts)))
    out = generate.sample(self.setup, self.params, prompts, sources, self.exclusion(), sampling,
                          gate_mode, seed, use_cache, self.tokenizer.eos,
                          self.tokenizer.vocab_size)
    return [{"prompt": t, "text": self.tokenizer.decode(o), "tokens": o, "mode": mode,
             "source": self.describe(int(s)), "policy": self.policy}
            for t, o, s in zip(texts, out, sources)]

  def score(self, prompts: list[str], answers: list[str], mode: str) -> np.ndarray:
    """log p(answer | prompt) per item in a serving mode (for the evaluation code)."""
    sources, gate_mode = self.sources_for(prompts, mode)
    p = [self.encode(t) for t in prompts]
    a = [self.tokenizer.encode(t) for t in answers]
    return generate.score(self.setup, self.params, p, a, sources, self.exclusion(), gate_mode)

  def describe(self, source_id: int) -> str | None:
    """How a response names the source it used: 'TITLE (id N)', or None (no sinks)."""
    if source_id == 0:
      return None
    row = self.board.catalog.get(f"id:{source_id}")
    return f"{row['title']} (id {source_id})"


def routing_accuracy(server: Server, limit: int = 1000) -> tuple[float, int]:
  """Top-1 accuracy of routing each surviving trained source's title to that source."""
  candidates = set(server.router.ids.tolist())
  rows = [r for r in server.board.page("active", 0, 2**31) if r["id"] in candidates][:limit]
  queries = Router.embed(server.setup, server.params, [server.encode(r["title"]) for r in rows])
  routed = server.router.rank(queries, server.alive())
  return float(np.mean(routed == np.asarray([r["id"] for r in rows]))), len(rows)


def capacity(run_dir: str, counts: list[int], sample: int = 512, seed: int = 0) -> list[dict]:
  """Fraction of retained sources' sinks that the exclude policy zeroes when n sources are
  unlearned: the run's actual unlearned sources first, then random active ones. `expected`
  is 1 - (1 - k/P)^n (independent uniform k-subsets)."""
  cfg = directory.load_config(run_dir)
  spec = sinks.SinkSpec.from_config(cfg)
  if spec is None:
    raise UserError(f"{run_dir} is the dense control: it has no sinks")
  board = switchboard.Switchboard(run_dir)
  unlearned = board.unlearned_ids()
  active = np.asarray([r["id"] for r in board.page("active", 0, 2**31)], np.int32)
  board.close()
  if not len(active):
    raise UserError(f"every source of {run_dir} is unlearned: no retained source to measure")
  rng = np.random.default_rng(seed)
  order = np.concatenate([unlearned, rng.permutation(active)]).astype(np.int32)
  sample = min(sample, max(1, len(active) // 2))   # half the active ones may still be unlearned
  counts = sorted({max(0, min(c, len(order) - sample)) for c in counts} | {len(unlearned)})
  retained = rng.choice(order[max(counts):], min(sample, len(order) - max(counts)), replace=False)
  layer_masks = jax.jit(lambda ids: jnp.stack([
      sinks.pool_mask(spec.mlp, spec.seed, sinks.MLP_SALT, spec.exact, ids, layer)
      for layer in range(spec.mask_layers)]))
  mine = np.asarray(layer_masks(retained))                       # [Lm, S, P]
  union, done, rows = np.zeros((spec.mask_layers, spec.mlp.size), bool), 0, []
  for n in counts:
    for start in range(done, n, 4096):
      chunk = np.zeros(4096, np.int32)
      part = order[start:min(n, start + 4096)]
      chunk[:len(part)] = part
      union |= np.asarray(layer_masks(chunk)).any(1)
    done = n
    lost = ((mine & union[:, None, :]).sum(-1) / np.maximum(mine.sum(-1), 1)).mean(0)
    rows.append({"unlearned": n, "expected": 1 - (1 - spec.mlp.k / spec.mlp.size) ** n,
                 "mean": float(lost.mean()), "p95": float(np.percentile(lost, 95)),
                 "max": float(lost.max()), "now": n == len(unlearned),
                 "retained": len(retained)})
  return rows
