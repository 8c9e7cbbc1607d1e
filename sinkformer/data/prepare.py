"""`sinkformer data prepare`: corpus -> tokenizer, source catalog, ArrayRecord shards, manifest.

Output directory:
  manifest.json     counts, skipped lines, tokenizer/corpus/catalog hashes, shard list
  tokenizer.model   SentencePiece BPE (trained here on a seeded sample of the whole corpus,
                    unless one is given)
  catalog.sqlite    source ids (see catalog.py) and the document -> source map
  documents.npz     per document (record order): source_ids, lengths (what the packer needs)
  records-NNNNN.array_record   one record per document: int32 [source_id, tokens...], at most
                    SHARD_CHUNKS chunks per shard (the unit a continued prepare restarts
                    from). group_size 1 by default (one record per chunk: a random read
                    decodes no neighbours, and Grain's ArrayRecord source logs an error for
                    any other size)
  tfds/             optionally the same records as a TFDS array_record dataset

Tokenization runs in worker processes (all cores); the main process parses the corpus,
keeps the catalog (one transaction per chunk of documents) and writes the shards in order,
so the output does not depend on the number of workers. Everything is written to
OUT.partial and renamed at the end, so OUT is complete or absent. A prepare that is killed
continues where it stopped when run again with the same arguments: OUT.partial keeps a
journal (progress.json) of the shards that are complete, and the catalog rows of a shard in
progress are rolled back. Bad input (a malformed line, a duplicate key, a vocabulary too
small) stops it with a message naming the line or the minimum, and leaves nothing behind.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import threading
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from sinkformer import config as config_lib, storage
from sinkformer.data import catalog as catalog_lib, corpora, fetch, records as records_lib
from sinkformer.data import tokenizer as tok_lib
from sinkformer.errors import UserError

CHUNK = 4096                       # documents per catalog transaction and per worker task
SHARD_CHUNKS = 65536               # ArrayRecord chunks per shard
JOURNAL = "progress.json"


def resolve_corpus(spec: str, data_dir: str | None) -> str:
  """A fetchable name -> its JSONL (fetched now if needed); anything else as given."""
  return fetch.fetch(spec, data_dir) if spec in fetch.CORPORA else spec


def _source_of(key, title, group, origin, source_by: str) -> tuple[str, str, str | None]:
  if source_by == "group":
    if group is None:
      raise UserError(f"{origin}: document {key!r} has no group, but sources are groups "
                      "(--source_by=group); give it one or use --source_by=document")
    return group, group, group
  return key, title, group


def prepare(corpus: str, out: str, log=print, **options) -> dict:
  """Prepare `corpus` into `out`, a directory or a bucket path (made in a local staging
  directory, then published manifest last); `options` as for `prepare_local`. Returns the
  manifest."""
  if not storage.is_remote(out):
    return prepare_local(corpus, out, log=log, **options)
  if (storage.path(out) / "manifest.json").exists():
    raise UserError(f"{out} is already prepared; remove it or choose another --out")
  local = storage.staging(out)
  manifest = prepare_local(corpus, local, log=log, **options)
  log(f"uploading to {out}")
  storage.publish(local, out, last="manifest.json")
  storage.keep_as_cache(local, out)
  return manifest


def prepare_local(corpus: str, out: str, *, vocab_size: int = 8192,
                  tokenizer: str | None = None, source_by: str = "document",
                  skip_bad: bool = False, shard_docs: int | None = None, group_size: int = 1,
                  tfds: bool = False, data_dir: str | None = None, tfds_dir: str | None = None,
                  workers: int | None = None, seed: int = 0, log=print) -> dict:
  """Prepare `corpus` into the local directory `out` (continuing an interrupted prepare of
  the same arguments); returns the manifest."""
  if source_by not in config_lib.SOURCE_BY:
    raise UserError(f"--source-by must be one of {', '.join(config_lib.SOURCE_BY)}, not "
                    f"{source_by!r}")
  if os.path.exists(os.path.join(out, "manifest.json")):
    raise UserError(f"{out} is already prepared; remove it or choose another --out")
  start = time.perf_counter()
  path = resolve_corpus(corpus, data_dir)
  read = lambda counts: corpora.read(path, counts, skip_bad, tfds_dir)
  read(corpora.Counts())   # a missing or unrecognised corpus fails here, before any work
  settings = {"corpus": corpus, "source": _fingerprint(path), "vocab_size": vocab_size,
              "tokenizer": tok_lib.load(tokenizer).sha256 if tokenizer else None,
              "source_by": source_by, "skip_bad": skip_bad,
              "shard_docs": shard_docs or SHARD_CHUNKS * group_size, "group_size": group_size,
              "seed": seed, "format": records_lib.FORMAT, "journal": 2}
  tmp = out.rstrip("/") + ".partial"
  journal = _read_journal(tmp)
  if journal and journal["settings"] == settings:
    log(f"continuing the prepare in {tmp}: {journal['documents']:,} documents done")
  else:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    journal = {"settings": settings, "documents": 0, "shards": [], "sources": 0,
               "tokenizer": None, "items": 0, "text_bytes": 0, "counts": {}}
  try:
    manifest = _prepare(read, path, corpus, tmp, tokenizer, journal, workers, log)
    if tfds:
      manifest["tfds"] = write_tfds(tmp, manifest["shards"])
  except UserError:   # bad input: nothing is left behind
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  manifest["seconds"] = round(time.perf_counter() - start, 2)
  with open(os.path.join(tmp, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  os.remove(os.path.join(tmp, JOURNAL))
  os.replace(tmp, out)
  return manifest


def _fingerprint(path: str):
  """What says the corpus is the one an interrupted prepare read (files: size and mtime)."""
  p = storage.path(path)
  if p.is_file():
    info = p.stat()
    return [info.length, info.mtime]
  return path


def _read_journal(tmp: str) -> dict | None:
  try:
    with open(os.path.join(tmp, JOURNAL)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_journal(tmp: str, journal: dict):
  with open(os.path.join(tmp, JOURNAL + ".tmp"), "w") as f:
    json.dump(journal, f)
  os.replace(os.path.join(tmp, JOURNAL + ".tmp"), os.path.join(tmp, JOURNAL))


def _chunks(path: str, read, skip: int, size: int):
  """The corpus after its first `skip` items, as (items, task) chunks of `size` items for the
  workers: raw lines of a JSONL file (parsed by the workers, so the slowest part of reading
  runs on every core) or documents read here (other formats)."""
  if corpora.is_jsonl(path):
    with storage.path(path).open("rb") as f:
      lines, first = itertools.islice(f, skip, None), skip + 1
      while chunk := list(itertools.islice(lines, size)):
        yield len(chunk), ("jsonl", path, first, chunk)
        first += len(chunk)
    return
  docs = itertools.islice(read(), skip, None)
  while chunk := list(itertools.islice(docs, size)):
    yield len(chunk), ("docs", [(d.key, d.title, d.group, d.text, d.origin) for d in chunk])


def _parse(task, skip_bad: bool) -> tuple[list[tuple], corpora.Counts]:
  """A chunk's documents [(key, title, group, text, origin)] and what parsing skipped."""
  counts = corpora.Counts()
  if task[0] == "docs":
    return task[1], counts
  _, path, first, lines = task
  docs = (corpora.parse_jsonl_line(raw, f"{path}:{first + i}", counts, skip_bad)
          for i, raw in enumerate(lines))
  return [(d.key, d.title, d.group, d.text, d.origin) for d in docs if d is not None], counts


def _ordered(pool, fn, chunks, workers: int):
  """(items, fn(task)) for every chunk, in order, with at most two tasks per worker in
  flight (memory stays bounded however fast the reader is)."""
  pending, room, closing = collections.deque(), threading.Semaphore(2 * workers), threading.Event()

  def tasks():
    for items, task in chunks:
      while not room.acquire(timeout=0.1):
        if closing.is_set():   # the consumer stopped: let the pool shut down
          return
      pending.append(items)
      yield task

  try:
    for result in pool.imap(fn, tasks()):
      items = pending.popleft()
      room.release()
      yield items, result
  finally:
    closing.set()


_WORKER = {}


def _start_worker(skip_bad: bool, model: bytes | None):
  _WORKER.update(skip_bad=skip_bad, tok=model and tok_lib.Tokenizer(model))


def _pieces(task) -> list[str]:
  """A worker's task while the tokenizer trains: the chunk's text cut into pieces."""
  docs, _ = _parse(task, _WORKER["skip_bad"])
  return [p for d in docs for p in tok_lib.pieces(d[3])]


def _encode(task):
  """A worker's task: the chunk's documents [(key, title, group, origin)], each one's tokens
  (BOS + pieces + EOS) as little-endian int32 bytes, their lengths, the chunk's digest, its
  UTF-8 size and what parsing skipped."""
  docs, counts = _parse(task, _WORKER["skip_bad"])
  encoded = _WORKER["tok"].encode_documents([d[3] for d in docs], threads=1)
  digest = hashlib.sha256()
  for d in docs:
    digest.update(json.dumps(d[:4]).encode())
  return ([(d[0], d[1], d[2], d[4]) for d in docs], [records_lib.encode_tokens(t) for t in encoded],
          [len(t) for t in encoded], digest.digest(), sum(len(d[3].encode()) for d in docs),
          counts)


def _pool(workers: int, skip_bad: bool, model: bytes | None = None):
  return multiprocessing.get_context("spawn").Pool(workers, _start_worker, (skip_bad, model))


def _prepare(read, path, corpus, tmp, tokenizer, journal, workers, log) -> dict:
  settings = journal["settings"]
  workers = workers or os.cpu_count() or 1
  size = min(CHUNK, settings["shard_docs"])
  model_path = os.path.join(tmp, "tokenizer.model")
  if journal["tokenizer"]:
    tok = tok_lib.load(model_path)
  elif tokenizer:
    tok = tok_lib.load(tokenizer)
    shutil.copyfile(tokenizer, model_path)
  else:
    log(f"training a {settings['vocab_size']}-piece BPE tokenizer on a sample of {corpus}")
    with _pool(workers, settings["skip_bad"]) as pool, contextlib.closing(_ordered(
        pool, _pieces, _chunks(path, lambda: read(corpora.Counts()), 0, size), workers)) as parts:
      counted = [0]

      def blocks():   # the pass that samples the tokenizer's text also counts the corpus
        for items, pieces in parts:
          counted[0] += items
          yield pieces
      lines = tok_lib.sample_pieces(blocks(), settings["seed"])
    journal["total_items"] = counted[0]
    if not lines:
      raise UserError(f"{corpus} has no documents with text: nothing to train a tokenizer on "
                      "(every line blank, empty or skipped as malformed)")
    tok = tok_lib.train(lines, settings["vocab_size"], model_path)
    del lines
  journal["tokenizer"] = tok.sha256
  _write_journal(tmp, journal)

  cat_path = os.path.join(tmp, "catalog.sqlite")
  cat = catalog_lib.Catalog(cat_path, create=not os.path.exists(cat_path))   # or continue it
  try:
    cat.db.execute("PRAGMA synchronous=NORMAL")   # WAL: still safe against a killed process
    cat.without_lookup_indexes()                  # built once at the end: faster than kept up
    manifest = _write(read, path, corpus, tmp, tok, cat, journal, workers, size, log)
    cat.with_lookup_indexes()
    return manifest
  finally:
    cat.close()


def _write(read, path, corpus, tmp, tok, cat, journal, workers, size, log) -> dict:
  """Catalog, shards and documents.npz after the journal's position; the manifest."""
  settings = journal["settings"]
  with cat.batch():   # roll back the catalog rows of a shard that was in progress
    cat.db.execute("DELETE FROM documents WHERE id >= ?", (journal["documents"],))
    cat.db.execute("DELETE FROM sources WHERE id > ?", (journal["sources"],))
    cat.db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'sources'",
                   (journal["sources"],))
  reader_counts = corpora.Counts()   # what this process's reader skips (not JSONL)
  parsed = corpora.Counts(**journal["counts"])   # what the workers' parsing skipped
  items, ordinal, text_bytes = journal["items"], journal["documents"], journal["text_bytes"]
  writer = None
  with open(os.path.join(tmp, "tokenizer.model"), "rb") as f:
    model = f.read()
  chunks = _chunks(path, lambda: read(reader_counts), items, size)
  progress = _Progress(journal.get("total_items"), items, log)
  with _pool(workers, settings["skip_bad"], model) as pool, contextlib.closing(
      _ordered(pool, _encode, chunks, workers)) as results:
    for n, (docs, records, lengths, digest, size_, counts) in results:
      with cat.batch():
        ids = cat.add_documents([(key, *_source_of(key, title, group, origin,
                                                   settings["source_by"]), origin, ordinal + i)
                                 for i, (key, title, group, origin) in enumerate(docs)])
      if writer is None:
        name = f"records-{len(journal['shards']):05d}.array_record"
        writer = ArrayRecordWriter(os.path.join(tmp, name),
                                   f"group_size:{settings['group_size']}")
        shard_hash, shard_sources, shard_lengths = hashlib.sha256(), [], []
      for source_id, record in zip(ids, records):
        writer.write(records_lib.encode(source_id, record))
      shard_hash.update(digest)
      shard_sources += ids
      shard_lengths += lengths
      ordinal, items = ordinal + len(docs), items + n
      text_bytes += size_
      parsed.add(counts)
      if len(shard_sources) >= settings["shard_docs"]:   # the journal may move past it
        writer.close()
        writer = None
        _close_shard(tmp, journal, name, shard_hash, shard_sources, shard_lengths, ordinal,
                     cat, dict(items=items, text_bytes=text_bytes, counts=vars(parsed)))
      progress.advance(items, f"{ordinal:,} documents, {len(cat):,} sources")
  progress.close()
  if writer is not None:
    writer.close()
    _close_shard(tmp, journal, name, shard_hash, shard_sources, shard_lengths, ordinal, cat,
                 dict(items=items, text_bytes=text_bytes, counts=vars(parsed)))
  parsed.add(reader_counts)
  if not ordinal:
    raise UserError(f"{corpus} has no documents (skipped: {parsed.empty} empty, "
                    f"{parsed.malformed} malformed)")

  shards = [s["file"] for s in journal["shards"]]
  arrays = [np.load(os.path.join(tmp, s["file"] + ".docs.npy")) for s in journal["shards"]]
  sources, lengths = np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays])
  for s in journal["shards"]:
    os.remove(os.path.join(tmp, s["file"] + ".docs.npy"))
  per_source = np.stack([np.bincount(sources), np.bincount(sources, lengths).astype(np.int64)])
  ids = np.flatnonzero(per_source[0])
  with cat.batch():   # every source has a document: each row is set once
    cat.set_counts(zip(ids, per_source[0, ids], per_source[1, ids]))
  np.savez(os.path.join(tmp, "documents.npz"), source_ids=sources, lengths=lengths)
  corpus_hash = hashlib.sha256("".join(s["sha256"] for s in journal["shards"]).encode())
  manifest = {
      "format": records_lib.FORMAT, "shards": shards, "group_size": settings["group_size"],
      "shard_documents": [s["documents"] for s in journal["shards"]],
      "documents": int(ordinal), "tokens": int(lengths.sum()), "sources": len(cat),
      "source_by": settings["source_by"],
      "skipped": {"empty": parsed.empty, "malformed": parsed.malformed},
      "invalid_utf8_documents": parsed.invalid_utf8,
      "per_source": {name: {"min": int(v[ids].min()), "median": float(np.median(v[ids])),
                            "max": int(v[ids].max())}
                     for name, v in (("documents", per_source[0]), ("tokens", per_source[1]))},
      "tokenizer": {"file": "tokenizer.model", "sha256": tok.sha256, "vocab_size": tok.vocab_size},
      "corpus": {"spec": corpus, "sha256": corpus_hash.hexdigest()},
      "catalog_sha256": cat.digest(),
      "bytes_per_token": round(text_bytes / (int(lengths.sum()) - 2 * ordinal), 3),
      "seconds": None, "tfds": None,
  }
  return manifest


class _Progress:
  """How far the writing pass is: a bar (total, rate, ETA) on a terminal, and a line every
  30 s for logs. The total is the corpus' item count from the tokenizer's pass (unknown with
  a given --tokenizer: then rate only)."""

  def __init__(self, total: int | None, done: int, log):
    from tqdm import tqdm
    self.total, self.first, self.log = total, done, log
    self.start = self.last = time.perf_counter()
    self.bar = tqdm(total=total, initial=done, unit=" items", unit_scale=True, leave=False,
                    disable=None, desc="prepare")   # None: off unless stderr is a terminal

  def advance(self, done: int, what: str):
    self.bar.update(done - self.bar.n)
    now = time.perf_counter()
    if now - self.last < 30:
      return
    self.last = now
    rate = (done - self.first) / (now - self.start)
    where = f" of {self.total:,} ({100 * done / self.total:.0f}%)" if self.total else ""
    left = (self.total - done) / rate if self.total and rate else None
    eta = f", ETA {int(left // 60)}m{int(left % 60):02d}s" if left is not None else ""
    self.log(f"  {done:,} items{where}: {what}, {rate:,.0f} items/s{eta}")

  def close(self):
    self.bar.close()


def _close_shard(tmp, journal, name, shard_hash, sources, lengths, ordinal, cat, position):
  """Record a complete shard: its documents' sources and lengths, and the journal entry
  (`position`: corpus items read, text bytes, parsing counts) that lets an interrupted
  prepare continue after it."""
  np.save(os.path.join(tmp, name + ".docs.npy"), np.asarray([sources, lengths], np.int32))
  journal["shards"].append({"file": name, "documents": len(sources),
                            "sha256": shard_hash.hexdigest()})
  first_seen = cat.db.execute("SELECT coalesce(max(source_id), 0) FROM documents WHERE id < ?",
                              (ordinal,)).fetchone()[0]   # sources first seen later roll back
  journal.update(documents=ordinal, sources=first_seen, **position)
  _write_journal(tmp, journal)


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
        source_id, tokens = records_lib.decode(records[i])
        yield i, {"source_id": source_id, "tokens": tokens}

  builder = SinkformerRecords(data_dir=os.path.join(directory, "tfds"), file_format="array_record")
  builder.download_and_prepare()
  return {"name": builder.name, "data_dir": "tfds", "split": "train"}
