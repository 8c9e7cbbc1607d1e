"""SentencePiece BPE: trained deterministically on a seeded sample of a corpus, saved with
the prepared data.

Ids: 0 = pad (also the packer's padding), 1 = unk, 2 = bos, 3 = eos; byte fallback means no
text is ever unknown. SentencePiece silently drops training lines longer than
`max_sentence_length`, so text is fed in pieces cut at whitespace below that length. The
training lines are a uniform sample of the whole corpus (reservoir sampling, seeded), held in
Python before SentencePiece sees them: a bad corpus line is reported by the reader as
FILE:LINE, not lost inside the C++ trainer.
"""

from __future__ import annotations

import collections
import hashlib
import io
import re

import numpy as np
import sentencepiece as spm

from sinkformer.errors import UserError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
MAX_PIECE_BYTES = 4000   # below SentencePiece's default max_sentence_length (4192 bytes)
SAMPLE_LINES = 2_000_000
COVERAGE = 0.9995        # SentencePiece's character_coverage
RESERVED = 4 + 256       # the special pieces and byte fallback's 256 byte pieces


def pieces(text: str, limit: int = MAX_PIECE_BYTES):
  """Lines of `text`, long ones cut at whitespace into parts of at most `limit` UTF-8 bytes."""
  for line in text.splitlines():
    while len(line.encode()) > limit:
      head = line.encode()[:limit].decode("utf-8", errors="ignore")
      cut = head.rfind(" ")
      cut = cut if cut > 0 else len(head)
      yield line[:cut]
      line = line[cut:].lstrip()
    if line.strip():
      yield line


def sample(texts, seed: int = 0, limit: int = SAMPLE_LINES) -> list[str]:
  """A uniform sample of at most `limit` lines (`pieces`) of all the texts, the same for the
  same texts and seed (reservoir sampling, random numbers drawn a block of lines at a time)."""
  return sample_pieces((list(pieces(t)) for t in texts), seed, limit)


def sample_pieces(blocks, seed: int = 0, limit: int = SAMPLE_LINES) -> list[str]:
  """`sample` of texts already cut into pieces: `blocks` yields lists of pieces, in order."""
  rng = np.random.default_rng(seed)
  kept, seen, block = [], 0, []

  def flush():
    nonlocal seen
    slots = rng.integers(0, seen + np.arange(1, len(block) + 1))   # line i replaces slot < i+1
    for line, slot in zip(block, slots):
      if len(kept) < limit:
        kept.append(line)
      elif slot < limit:
        kept[slot] = line
    seen += len(block)
    block.clear()

  for part in blocks:
    block.extend(part)
    if len(block) >= 65536:
      flush()
  flush()
  return kept


def required_pieces(lines: list[str]) -> int:
  """The fewest pieces SentencePiece will accept for these lines: the reserved ones plus the
  characters that cover COVERAGE of all characters (whitespace counted as one symbol)."""
  counts = collections.Counter()
  for start in range(0, len(lines), 65536):
    counts.update("".join(" ".join(lines[start:start + 65536]).split(" ")))
  counts[" "] = sum(len(line.split()) for line in lines)   # each word is preceded by one
  total, covered, chars = sum(counts.values()), 0, 0
  for _, n in counts.most_common():
    if covered >= COVERAGE * total:
      break
    covered, chars = covered + n, chars + 1
  return RESERVED + chars


def train(lines: list[str], vocab_size: int, path: str) -> "Tokenizer":
  """Train a BPE of `vocab_size` pieces on training lines (`sample`) and save it to `path`."""
  least = required_pieces(lines)
  if vocab_size < least:
    raise UserError(f"--vocab-size {vocab_size} is too small for this corpus: it needs at "
                    f"least {least} pieces ({RESERVED - 4} byte-fallback pieces, 4 special "
                    f"ones and {least - RESERVED} characters)")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=COVERAGE, pad_id=PAD,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, input_sentence_size=0,   # all: already sampled
        shuffle_input_sentence=False, num_threads=1, minloglevel=2)
  except RuntimeError as e:
    message = str(e).strip().splitlines()[-1]
    small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if small:   # our count of the characters fell short of SentencePiece's
      raise UserError(f"--vocab-size {vocab_size} is too small for this corpus: it needs at "
                      f"least {small.group(2)} pieces") from None
    raise UserError(f"could not train a {vocab_size}-piece tokenizer: "
                    f"{message.split('] ')[-1]}") from None
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return load(path)


def load(path: str) -> "Tokenizer":
  try:
    with open(path, "rb") as f:
      blob = f.read()
    return Tokenizer(blob)
  except (OSError, RuntimeError) as e:
    raise UserError(f"cannot load tokenizer {path}: {e}") from None


class Tokenizer:
  def __init__(self, blob: bytes):
    self.sp = spm.SentencePieceProcessor(model_proto=blob)
    self.sha256 = hashlib.sha256(blob).hexdigest()
    self.vocab_size = self.sp.vocab_size()
    self.bos, self.eos = BOS, EOS

  def encode_documents(self, texts: list[str], threads: int = 2) -> list[np.ndarray]:
    """BOS + pieces + EOS for each text, as int32 arrays."""
    ids = self.sp.encode(texts, num_threads=threads)
    return [np.asarray([BOS, *x, EOS], np.int32) for x in ids]

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids if i > EOS])

  def piece(self, i: int) -> str:
    """Token `i` as a string (special tokens by their names: <s>, </s>)."""
    return self.sp.id_to_piece(int(i))

