"""`sinkformer data prepare`: corpus -> tokenizer, source catalog, ArrayRecord shards, manifest.

Output directory:
  manifest.json     counts, skipped lines, tokenizer/corpus/catalog hashes, shard list
  tokenizer.model   SentencePiece BPE (trained here unless one is given)
  catalog.sqlite    source ids (see catalog.py) and the document -> source map
  documents.npz     per document (record order): source_ids, lengths (what the packer needs)
  records-NNNNN.array_record   one record per document: int32 [source_id, tokens...];
                    group_size 1 by default (one record per chunk: random access reads
                    no neighbours); millions of tiny documents read faster with larger
                    groups, because ArrayRecord's per-call cost grows with the chunk count
  tfds/             optionally the same records as a TFDS array_record dataset
Everything is written to OUT.partial and renamed at the end, so OUT is complete or absent.
Memory stays bounded: documents stream through in chunks; per-source counts are arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from sinkformer.data import catalog as catalog_lib, corpora, fetch, tokenizer as tok_lib
from sinkformer.errors import UserError

FORMAT = "sinkformer-records-v1"   # little-endian int32 [source_id, tokens...]
CHUNK = 4096


def encode_record(source_id: int, tokens: np.ndarray) -> bytes:
  return np.concatenate([[source_id], tokens]).astype("<i4").tobytes()


def decode_record(blob: bytes) -> tuple[int, np.ndarray]:
  values = np.frombuffer(blob, "<i4")
  return int(values[0]), values[1:].astype(np.int32)


def resolve_corpus(spec: str, data_dir: str | None) -> str:
  """A fetchable name -> its JSONL (fetched now if needed); anything else as given."""
  return fetch.fetch(spec, data_dir) if spec in fetch.CORPORA else spec


def _source_of(doc: corpora.Document, source_by: str) -> tuple[str, str, str | None]:
  if source_by == "group":
    if doc.group is None:
      raise UserError(f"{doc.origin}: document {doc.key!r} has no group, but sources are "
                      "groups (--source_by=group); give it one or use --source_by=document")
    return doc.group, doc.group, doc.group
  return doc.key, doc.title, doc.group


def _chunks(docs, size: int):
  chunk = []
  for doc in docs:
    chunk.append(doc)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def prepare(corpus: str, out: str, *, vocab_size: int = 8192, tokenizer: str | None = None,
            source_by: str = "document", skip_bad: bool = False, shard_docs: int = 1_000_000,
            group_size: int = 1, tfds: bool = False, data_dir: str | None = None, tfds_dir: str | None = None,
            log=print) -> dict:
  """Prepare `corpus` into `out`; returns the manifest."""
  if source_by not in ("document", "group"):
    raise UserError(f"--source_by must be 'document' or 'group', not {source_by!r}")
  if os.path.exists(os.path.join(out, "manifest.json")):
    raise UserError(f"{out} is already prepared; remove it or choose another --out")
  start = time.perf_counter()
  path = resolve_corpus(corpus, data_dir)
  read = lambda counts: corpora.read(path, counts, skip_bad, tfds_dir)
  read(corpora.Counts())   # a missing or unrecognised corpus fails here, before any work
  tmp = out.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    manifest = _prepare(read, corpus, tmp, vocab_size, tokenizer, source_by, shard_docs,
                        group_size, log)
    if tfds:
      manifest["tfds"] = write_tfds(tmp, manifest["shards"])
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  manifest["seconds"] = round(time.perf_counter() - start, 2)
  with open(os.path.join(tmp, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, out)
  return manifest


def _prepare(read, corpus, tmp, vocab_size, tokenizer, source_by, shard_docs, group_size,
             log) -> dict:
  start = time.perf_counter()
  model_path = os.path.join(tmp, "tokenizer.model")
  if tokenizer:
    tok = tok_lib.load(tokenizer)
    shutil.copyfile(tokenizer, model_path)
  else:
    log(f"training a {vocab_size}-piece BPE tokenizer on {corpus}")
    tok = tok_lib.train((d.text for d in read(corpora.Counts())), vocab_size, model_path)

  counts, corpus_hash = corpora.Counts(), hashlib.sha256()
  cat = catalog_lib.Catalog(os.path.join(tmp, "catalog.sqlite"), create=True)
  doc_sources, doc_lengths, shards = [], [], []
  per_source = np.zeros((2, 1024), np.int64)   # [documents, tokens] by source id, grown
  writer, ordinal, text_bytes = None, 0, 0
  for chunk in _chunks(read(counts), CHUNK):
    with cat.batch():
      ids = []
      for i, doc in enumerate(chunk):
        key, title, group = _source_of(doc, source_by)
        ids.append(cat.add_document(doc.key, key, title, group, doc.origin, ordinal + i))
        corpus_hash.update(json.dumps([doc.key, doc.title, doc.group, doc.text]).encode())
    text_bytes += sum(len(d.text.encode()) for d in chunk)
    encoded = tok.encode_documents([d.text for d in chunk])
    for source_id, tokens in zip(ids, encoded):
      if ordinal % shard_docs == 0:
        writer and writer.close()
        shards.append(f"records-{len(shards):05d}.array_record")
        writer = ArrayRecordWriter(os.path.join(tmp, shards[-1]), f"group_size:{group_size}")
      writer.write(encode_record(source_id, tokens))
      ordinal += 1
    ids = np.asarray(ids)
    lengths = np.asarray([len(t) for t in encoded], np.int32)
    if ids.max() >= per_source.shape[1]:
      per_source = np.pad(per_source, ((0, 0), (0, max(ids.max() + 1, 2 * per_source.shape[1])
                                                - per_source.shape[1])))
    np.add.at(per_source[0], ids, 1)
    np.add.at(per_source[1], ids, lengths)
    doc_sources.append(ids.astype(np.int32))
    doc_lengths.append(lengths)
    if ordinal % (CHUNK * 64) < len(chunk):
      log(f"  {ordinal:,} documents, {len(cat):,} sources, {time.perf_counter() - start:.0f}s")
  writer and writer.close()
  if not ordinal:
    raise UserError(f"{corpus} has no documents (skipped: {counts.empty} empty, "
                    f"{counts.malformed} malformed)")

  ids = np.flatnonzero(per_source[0])
  with cat.batch():
    cat.add_counts(zip(ids, per_source[0, ids], per_source[1, ids]))
  sources, lengths = np.concatenate(doc_sources), np.concatenate(doc_lengths)
  np.savez(os.path.join(tmp, "documents.npz"), source_ids=sources, lengths=lengths)
  manifest = {
      "format": FORMAT, "shards": shards, "group_size": group_size, "documents": int(ordinal),
      "tokens": int(lengths.sum()), "sources": len(cat), "source_by": source_by,
      "skipped": {"empty": counts.empty, "malformed": counts.malformed},
      "invalid_utf8_documents": counts.invalid_utf8,
      "per_source": {name: {"min": int(v[ids].min()), "median": float(np.median(v[ids])),
                            "max": int(v[ids].max())}
                     for name, v in (("documents", per_source[0]), ("tokens", per_source[1]))},
      "tokenizer": {"file": "tokenizer.model", "sha256": tok.sha256, "vocab_size": tok.vocab_size},
      "corpus": {"spec": corpus, "sha256": corpus_hash.hexdigest()},
      "catalog_sha256": cat.digest(),
      "bytes_per_token": round(text_bytes / (int(lengths.sum()) - 2 * ordinal), 3),  # w/o BOS/EOS
      "seconds": None, "tfds": None,
  }
  cat.close()
  return manifest


def write_tfds(directory: str, shards: list[str]) -> dict:
  """The prepared records again as a TFDS array_record dataset (same order, one split),
  readable with tfds.data_source("sinkformer_records", data_dir=DIR/tfds)."""
  import tensorflow_datasets as tfds
  from grain.sources import ArrayRecordDataSource
  records = ArrayRecordDataSource([os.path.join(directory, s) for s in shards])

  class SinkformerRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          "source_id": tfds.features.Scalar(np.int32),
          "tokens": tfds.features.Sequence(tfds.features.Scalar(np.int32))}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(len(records)):
        source_id, tokens = decode_record(records[i])
        yield i, {"source_id": source_id, "tokens": tokens}

  builder = SinkformerRecords(data_dir=os.path.join(directory, "tfds"), file_format="array_record")
  builder.download_and_prepare()
  return {"name": builder.name, "data_dir": "tfds", "split": "train"}
