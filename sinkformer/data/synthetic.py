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

from sinkformer.errors import UserError

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


_C, _V = "bdfgklmnprst", "aeio"


def words(facts_per_source: int) -> list[str]:
  """The word of every token id, so the corpus can be read and prompted as text."""
  first = [f"{c.upper()}{v}lo" for c in _C for v in _V]            # 48 first names
  last = [f"{c.upper()}{v}rsk" for c in _C for v in _V]             # 48 surnames
  cities = [f"{c.upper()}{v}ville" for c in _C[:4] for v in _V]     # 16 cities
  rivers = [f"{c.upper()}{v}nne" for c in _C[:4] for v in _V]       # 16 rivers
  out = ["<pad>", "<s>", "</s>", ".", "lives_in", "river", *first, *last, *cities, *rivers,
         *(f"trait{r}" for r in range(facts_per_source)), *(f"val{n}" for n in range(VALUES))]
  assert len(out) == vocab_size(facts_per_source)
  return out


class Words:
  """The built-in corpus' tokenizer: one word per token (whitespace-separated)."""

  def __init__(self, facts_per_source: int):
    self.words = words(facts_per_source)
    self.ids = {w: i for i, w in enumerate(self.words)}
    self.vocab_size = len(self.words)
    self.bos, self.eos = BOS, EOS

  def encode(self, text: str) -> list[int]:
    unknown = [w for w in text.split() if w not in self.ids]
    if unknown:
      raise UserError(f"the built-in corpus has no word(s) {unknown[:5]}; it reads names "
                      "like 'Balo Barsk', 'lives_in', cities, 'river', 'trait0', 'val7' and '.'")
    return [self.ids[w] for w in text.split()]

  def decode(self, ids) -> str:
    return " ".join(self.words[i] for i in ids if i > EOS)

  def piece(self, i: int) -> str:
    """Token `i` as a string (special tokens by their names: <s>, </s>)."""
    return self.words[int(i)]


def title(doc: np.ndarray, words_: list[str]) -> str:
  """A built-in article's title: its person's name."""
  return f"{words_[doc[1]]} {words_[doc[2]]}"
