"""SentencePiece BPE: trained deterministically on a corpus, saved with the prepared data.

Ids: 0 = pad (also the packer's padding), 1 = unk, 2 = bos, 3 = eos; byte fallback means no
text is ever unknown. SentencePiece silently drops training lines longer than
`max_sentence_length`, so text is fed in pieces cut at whitespace below that length.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import sentencepiece as spm

from sinkformer.errors import UserError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
MAX_PIECE_BYTES = 4000   # below SentencePiece's default max_sentence_length (4192 bytes)


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


def train(texts, vocab_size: int, path: str, max_sentences: int = 2_000_000) -> "Tokenizer":
  """Train a BPE of `vocab_size` pieces on an iterable of texts and save it to `path`."""
  model = io.BytesIO()
  lines = (p for text in texts for p in pieces(text))
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.9995, pad_id=PAD, unk_id=UNK, bos_id=BOS,
        eos_id=EOS, input_sentence_size=max_sentences, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2)
  except RuntimeError as e:
    raise UserError(f"could not train a {vocab_size}-piece tokenizer: "
                    f"{str(e).strip().splitlines()[-1]}") from None
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

