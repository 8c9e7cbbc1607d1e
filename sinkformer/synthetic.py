"""The built-in corpus: a generated encyclopedia of fictional people, one source each.

No tokenizer or download needed: documents are token ids of a tiny closed vocabulary. Every
article states the person's city and the river of that city (a *shared* fact: the same
city->river pair appears in every article of that city) and `facts_per_source` *unique*
facts (relation -> random value). It exists so the trainer can run anywhere in seconds; real
text comes through the data pipeline.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS, EOS, PERIOD, LIVES_IN, RIVER = range(6)
NAMES, CITIES, VALUES = 48, 16, 96   # pool sizes


@dataclasses.dataclass(frozen=True)
class Corpus:
  docs: list[np.ndarray]   # int32 token ids, BOS ... EOS
  sources: np.ndarray      # int32 source id of each document (1-based)
  vocab_size: int


def vocab_size(facts_per_source: int) -> int:
  return RIVER + 1 + 2 * NAMES + 2 * CITIES + facts_per_source + VALUES


def generate(num_sources: int, facts_per_source: int, seed: int, first_id: int = 1) -> Corpus:
  """`num_sources` articles with source ids first_id.. (seeded, so any size is reproducible)."""
  rng = np.random.default_rng(seed)
  first, last = RIVER + 1, RIVER + 1 + NAMES
  city0 = last + NAMES
  river0 = city0 + CITIES
  rel0 = river0 + CITIES
  value0 = rel0 + facts_per_source
  # The world (city -> river) is fixed by the seed alone, so train and val sets share it.
  rivers = np.random.default_rng(seed).permutation(CITIES)
  docs = []
  for _ in range(num_sources):
    name = [first + rng.integers(NAMES), last + rng.integers(NAMES)]
    city = rng.integers(CITIES)
    doc = [BOS, *name, LIVES_IN, city0 + city, PERIOD, city0 + city, RIVER, river0 + rivers[city],
           PERIOD]
    for rel, value in enumerate(rng.integers(VALUES, size=facts_per_source)):
      doc += [*name, rel0 + rel, value0 + value, PERIOD]
    docs.append(np.asarray(doc + [EOS], np.int32))
  sources = np.arange(first_id, first_id + num_sources, dtype=np.int32)
  return Corpus(docs, sources, vocab_size(facts_per_source))
