"""Packing documents into fixed-length rows, and a step-indexed stream of batches.

A row holds several documents back to back; each token keeps its document's source id, a
segment id (1.., 0 = padding) and a position that restarts at every document. The target of
a token is the next token of the same document; the last token of a document and padding are
masked out of the loss.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("tokens", "targets", "loss_mask", "source_ids", "segment_ids", "positions")


def pack(docs, sources, seq_len: int, max_docs: int) -> dict[str, np.ndarray]:
  """Greedy in-order packing; documents longer than a row are cut into row-sized windows."""
  pieces = [(d[i:i + seq_len], s) for d, s in zip(docs, sources, strict=True)
            for i in range(0, max(len(d), 1), seq_len)]
  rows, current, used = [], [], 0
  for piece in pieces:
    if current and (used + len(piece[0]) > seq_len or len(current) == max_docs):
      rows.append(current)
      current, used = [], 0
    current.append(piece)
    used += len(piece[0])
  if current:
    rows.append(current)

  out = {f: np.zeros((len(rows), seq_len), np.int32) for f in FIELDS}
  for r, row in enumerate(rows):
    at = 0
    for segment, (tokens, source) in enumerate(row, start=1):
      span = slice(at, at + len(tokens))
      out["tokens"][r, span] = tokens
      out["targets"][r, at:at + len(tokens) - 1] = tokens[1:]
      out["loss_mask"][r, at:at + len(tokens) - 1] = 1
      out["source_ids"][r, span] = source
      out["segment_ids"][r, span] = segment
      out["positions"][r, span] = np.arange(len(tokens))
      at += len(tokens)
  return out


class Stream:
  """Batch `step` is a pure function of (rows, seed, step): resume anywhere, any process.

  Epoch e visits every row once in the order `permutation(seed, e)`; a batch may straddle two
  epochs. `process_slice` returns this process's contiguous share of the global batch.
  """

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int):
    self.rows, self.batch_size, self.seed = rows, batch_size, seed
    self.num_rows = len(rows["tokens"])
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: np.random.default_rng((self.seed, epoch)).permutation(self.num_rows)}
    return self._orders[epoch]

  def batch(self, step: int, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
    stop = self.batch_size if stop is None else stop
    flat = step * self.batch_size + np.arange(start, stop)
    index = np.array([self._order(g // self.num_rows)[g % self.num_rows] for g in flat])
    return {f: v[index] for f, v in self.rows.items()}

  def epoch_of(self, step: int) -> float:
    return step * self.batch_size / self.num_rows


def fixed_batches(rows: dict[str, np.ndarray], batch_size: int, count: int):
  """`count` evaluation batches in row order, wrapping around a small split."""
  n = len(rows["tokens"])
  for b in range(count):
    index = (b * batch_size + np.arange(batch_size)) % n
    yield {f: v[index] for f, v in rows.items()}
