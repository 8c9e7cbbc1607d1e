"""The record format of prepared shards, which the writer (prepare.py) and the reader
(pipeline.py) share: little-endian int32 [source_id, tokens...], one document a record."""

from __future__ import annotations

import struct

import numpy as np

FORMAT = "sinkformer-records-v1"   # the manifest's "format": what reads these records


def encode_tokens(tokens: np.ndarray) -> bytes:
  """A document's tokens as a record holds them (done in the workers, before the catalog
  has assigned the source id)."""
  return tokens.astype("<i4").tobytes()


def encode(source_id: int, tokens: bytes) -> bytes:
  """A shard record: the source id, then the tokens already encoded by `encode_tokens`."""
  return struct.pack("<i", source_id) + tokens


def decode(blob: bytes, copy: bool = True) -> tuple[int, np.ndarray]:
  """(source id, tokens); copy=False returns a read-only view of `blob`."""
  values = np.frombuffer(blob, "<i4")
  return int(values[0]), values[1:].astype(np.int32) if copy else values[1:]
