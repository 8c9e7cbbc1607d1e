"""Documents with source ids -> packed rows -> global batches that are a pure function of step.

Per epoch e (seed s): all documents in the order permutation(s, e), minus held-out and
excluded sources -> windows of at most seq_len tokens (a long document is cut; every window
keeps its source id) -> greedy in-order packing into rows of seq_len with at most
max_docs_per_row documents -> row r of the run is the next row in that sequence. Global batch
`step` is rows [step*B, (step+1)*B); a process builds only its slice. Because the order is
fixed before anything is removed, a run that excludes sources (the retrain oracle) sees the
same document sequence minus those sources. Nothing depends on worker or process counts, so
resuming at step n gives the batches an uninterrupted run would.

A token's target is the next token of the same document; the last token of a window and
padding are masked out of the loss. Document slots: segment ids 1.., 0 = padding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Callable, NamedTuple

import grain
import numpy as np

from sinkformer import config as config_lib, storage
from sinkformer.data import catalog as catalog_lib, fetch, prepare as prepare_lib, records
from sinkformer.data import synthetic
from sinkformer.data import tokenizer as tok_lib
from sinkformer.errors import ConfigError, UserError

FIELDS = ("tokens", "targets", "loss_mask", "source_ids", "segment_ids", "positions")


@dataclasses.dataclass
class DocSet:
  """Random-access documents: `read(indices)` -> token arrays; ids and lengths in memory."""
  name: str
  source_ids: np.ndarray        # [N] int32 (after any mixture offset)
  lengths: np.ndarray           # [N] int32
  read: Callable[[np.ndarray], list[np.ndarray]]
  vocab_size: int
  manifest: dict | None = None  # prepared data only
  path: str | None = None       # its local directory (a bucket's data: the cached copy)
  id_offset: int = 0            # added to the catalog's ids (mixtures)
  origin: str | None = None     # where it was opened from (absolute path or URI)


def in_memory(name: str, docs: list[np.ndarray], sources, vocab_size: int) -> DocSet:
  return DocSet(name, np.asarray(sources, np.int32), np.asarray([len(d) for d in docs], np.int32),
                lambda idx: [docs[i] for i in idx], vocab_size)


def open_prepared(origin: str, reader: str = "arrayrecord", id_offset: int = 0) -> DocSet:
  """A `sinkformer data prepare` directory, read from its ArrayRecord shards or its TFDS copy
  (in a bucket: from a local copy, storage.local_prepared)."""
  path = storage.local_prepared(origin)
  try:
    with open(os.path.join(path, "manifest.json")) as f:
      manifest = json.load(f)
  except OSError:
    raise UserError(f"{path} is not prepared data (no manifest.json); run 'sinkformer data "
                    f"prepare --corpus ... --out {path}'") from None
  if manifest.get("format") != records.FORMAT:
    raise UserError(f"{path} holds records of format {manifest.get('format')!r}; this version "
                    f"reads {records.FORMAT!r}: prepare the corpus again")
  index = np.load(os.path.join(path, "documents.npz"))
  if reader == "arrayrecord":
    read = Shards([os.path.join(path, s) for s in manifest["shards"]]).read
  elif reader == "tfds":
    import tensorflow_datasets as tfds
    info = manifest.get("tfds")
    if not info:
      raise UserError(f"{path} has no TFDS copy; prepare it with --tfds or use reader "
                      "'arrayrecord'")
    source = tfds.data_source(info["name"], split=info["split"],
                              data_dir=os.path.join(path, info["data_dir"]))
    read = lambda idx: [np.asarray(source[int(i)]["tokens"], np.int32) for i in idx]
  else:
    raise ConfigError("data.reader", f"{reader!r} is not one of {', '.join(config_lib.READERS)}")
  ids = index["source_ids"].astype(np.int32)
  return DocSet(os.path.basename(origin.rstrip("/")), ids + np.int32(id_offset) * (ids > 0),
                index["lengths"], read, manifest["tokenizer"]["vocab_size"], manifest, path,
                id_offset, origin if storage.is_remote(origin) else os.path.abspath(origin))


class Shards:
  """Records of ArrayRecord shards by global index.

  Each record is read with seek + read(): ~3 us at any shard size (measured), where the
  batched read(indices) call costs ~1.7 ns per chunk of its shard before it reads anything
  (0.45 ms per call at 262k chunks). Readers are opened once per thread (the loader's
  threads read concurrently); a reader's position is its own."""

  def __init__(self, paths: list[str]):
    from array_record.python.array_record_module import ArrayRecordReader
    self.paths, self._local = paths, threading.local()
    self._open = lambda p: ArrayRecordReader(p, "readahead_buffer_size:0,max_parallelism:0")
    sizes = [self._readers()[i].num_records() for i in range(len(paths))]
    self.starts = np.concatenate([[0], np.cumsum(sizes)])

  def _readers(self) -> list:
    if not hasattr(self._local, "readers"):
      self._local.readers = [self._open(p) for p in self.paths]
    return self._local.readers

  def read(self, indices) -> list[np.ndarray]:
    indices = np.asarray(indices, np.int64)
    shard = np.searchsorted(self.starts, indices, side="right") - 1
    readers, out = self._readers(), []
    for s, at in zip(shard.tolist(), (indices - self.starts[shard]).tolist()):
      readers[s].seek(at)
      out.append(records.decode(readers[s].read(), copy=False)[1])
    return out


class DocStream:
  """Packed rows of the documents selected by `keep`, epoch after epoch (see module doc).

  `remember` (a resumed run's record of the epochs it has seen) saves planning every earlier
  epoch to find where a late row lies: only the epochs read are planned."""

  def __init__(self, docs: DocSet, keep: np.ndarray | None, seq_len: int, max_docs: int,
               seed: int):
    self.docs, self.seq_len, self.max_docs, self.seed = docs, seq_len, max_docs, seed
    self.keep = np.ones(len(docs.lengths), bool) if keep is None else keep
    if not self.keep.any():
      raise UserError(f"{docs.name}: no documents left after holding out/excluding sources")
    self._plans: dict[int, tuple] = {}
    self._rows_per_epoch: list[int] = []
    self._lock = threading.RLock()

  def _plan(self, epoch: int):
    """(window doc, offset, length, row starts) of epoch `epoch`. The last few are cached:
    a batch may straddle two epochs, and evaluation rereads epoch 0 mid-run."""
    with self._lock:
      if epoch not in self._plans:
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.keep))
        order = order[self.keep[order]]
        if len(self._plans) == 4:
          del self._plans[next(iter(self._plans))]   # the least recently added
        self._plans[epoch] = pack_plan(order, self.docs.lengths[order], self.seq_len,
                                       self.max_docs)
      return self._plans[epoch]

  @property
  def rows_per_epoch(self) -> list[int]:
    """Rows of the epochs planned so far (what a checkpoint records)."""
    return list(self._rows_per_epoch)

  def remember(self, rows_per_epoch):
    """Take the epochs' row counts a checkpoint recorded, instead of planning them again."""
    with self._lock:
      if len(rows_per_epoch) > len(self._rows_per_epoch):
        self._rows_per_epoch = list(rows_per_epoch)

  def epoch_rows(self, epoch: int) -> int:
    with self._lock:   # reader threads share this stream
      while len(self._rows_per_epoch) <= epoch:
        self._rows_per_epoch.append(len(self._plan(len(self._rows_per_epoch))[3]) - 1)
      return self._rows_per_epoch[epoch]

  def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global row indices -> (epoch, row within the epoch) of each."""
    last = int(rows.max())
    while sum(self._rows_per_epoch) <= last:
      self.epoch_rows(len(self._rows_per_epoch))
    ends = np.cumsum(self._rows_per_epoch)
    epoch = np.searchsorted(ends, rows, side="right")
    return epoch, rows - (ends[epoch] - np.asarray(self._rows_per_epoch)[epoch])

  def rows(self, indices) -> dict[str, np.ndarray]:
    """The packed rows of global row `indices`: documents read once each, assembled with
    array operations."""
    indices = np.asarray(indices, np.int64)
    epoch, row = self._locate(indices)
    windows = []   # (doc, offset, length, row of the batch) per window, epoch by epoch
    for e in np.unique(epoch):
      doc, offset, length, starts = self._plan(int(e))
      mine = np.flatnonzero(epoch == e)
      first, count = starts[row[mine]], starts[row[mine] + 1] - starts[row[mine]]
      at = np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())
      windows.append((doc[at], offset[at], length[at], np.repeat(mine, count)))
    doc, offset, length, owner = (np.concatenate(x) for x in zip(*windows))
    wanted, slot = np.unique(doc, return_inverse=True)
    texts = self.docs.read(wanted)
    return assemble_windows(texts, slot, offset, length, self.docs.source_ids[doc], owner,
                            len(indices), self.seq_len)

  def epochs(self, row: int) -> float:
    epoch, r = self._locate(np.asarray([row]))
    return int(epoch[0]) + int(r[0]) / self._rows_per_epoch[int(epoch[0])]


def pack_plan(order, lengths, seq_len: int, max_docs: int):
  """Cut documents (in `order`) into windows of at most seq_len tokens and pack them greedily
  in order (next-fit, at most max_docs per row): (window doc, offset, length, row starts).

  Next-fit is sequential, but a row's end depends only on where it starts: `step[s]` (the
  next row's start) is computed for every window at once, and the chain of row starts from
  0 is read off by doubling (step, step∘step, ...): O(n log rows) array work, no loop over
  rows."""
  counts = -(-lengths // seq_len)                       # windows per document
  doc = np.repeat(order, counts)
  k = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)
  offset = (k * seq_len).astype(np.int64)
  length = np.minimum(seq_len, np.repeat(lengths, counts) - offset)
  ends = np.concatenate([[0], np.cumsum(length)])
  n = len(length)
  s = np.arange(n)
  fits = np.searchsorted(ends, ends[:-1] + seq_len, side="right") - 1
  step = np.concatenate([np.minimum(np.minimum(np.maximum(fits, s + 1), s + max_docs), n), [n]])
  path = np.zeros(1, np.int64)          # row starts 0 .. 2^j - 1 rows in
  while path[-1] < n:
    path = np.concatenate([path, step[path]])
    step = step[step]
  return doc, offset, length, np.concatenate([path[path < n], [n]])


def assemble_windows(texts, slot, offset, length, source, owner, rows: int,
                     seq_len: int) -> dict[str, np.ndarray]:
  """Per-token arrays (FIELDS) of `rows` rows from windows in row order: window w is
  texts[slot[w]][offset[w]:offset[w] + length[w]] of source[w], placed in row owner[w] after
  the row's earlier windows (segment ids 1.. within a row, positions restarting per
  window, a target for every token but a window's last)."""
  flat = np.concatenate(texts) if texts else np.zeros(0, np.int32)
  base = np.concatenate([[0], np.cumsum([len(t) for t in texts])])[:-1]
  starts = np.cumsum(length) - length
  first_of_row = np.concatenate([[True], owner[1:] != owner[:-1]])
  row_start = np.maximum.accumulate(np.where(first_of_row, np.arange(len(owner)), 0))
  column = starts - starts[row_start]
  segment = np.arange(len(owner)) - row_start + 1
  j = np.arange(length.sum()) - np.repeat(starts, length)      # position within its window
  src = np.repeat(base[slot] + offset, length) + j
  r, c = np.repeat(owner, length), np.repeat(column, length) + j
  out = {f: np.zeros((rows, seq_len), np.int32) for f in FIELDS}
  out["tokens"][r, c] = flat[src]
  inner = j < np.repeat(length, length) - 1
  out["targets"][r[inner], c[inner]] = flat[src[inner] + 1]
  out["loss_mask"][r[inner], c[inner]] = 1
  out["source_ids"][r, c] = np.repeat(source, length)
  out["segment_ids"][r, c] = np.repeat(segment, length)
  out["positions"][r, c] = j
  return out


def assemble(rows, seq_len: int) -> dict[str, np.ndarray]:
  """Rows of [(tokens, source_id), ...] -> the model's per-token arrays (see FIELDS)."""
  texts = [np.asarray(t, np.int32) for row in rows for t, _ in row]
  owner = np.asarray([r for r, row in enumerate(rows) for _ in row], np.int64)
  length = np.asarray([len(t) for t in texts], np.int64)
  source = np.asarray([s for row in rows for _, s in row], np.int32)
  return assemble_windows(texts, np.arange(len(texts)), np.zeros(len(texts), np.int64), length,
                          source, owner, len(rows), seq_len)


class Batches:
  """Global batch `step` of a weighted mixture of streams (one stream: weight 1).

  Each stream gets a fixed number of the B slots of every batch (largest remainder of
  weight * B, at least one), interleaved evenly; stream c's rows are consumed in order.
  """

  def __init__(self, streams: list[DocStream], weights: list[float], batch_size: int):
    self.streams, self.batch_size = streams, batch_size
    share = np.asarray(weights, float) / np.sum(weights) * batch_size
    quota = np.floor(share).astype(int)
    quota[np.argsort(quota - share)[:batch_size - quota.sum()]] += 1
    if (quota == 0).any():
      raise ConfigError("data.corpus", f"weights {weights} give a corpus no row of a "
                        f"{batch_size}-row batch; raise its weight or the batch size")
    self.quota = quota
    slots = sorted(((j + 0.5) / q, c, j) for c, q in enumerate(quota) for j in range(q))
    self.slots = [(c, j) for _, c, j in slots]

  def batch(self, step: int, rows=None) -> dict[str, np.ndarray]:
    """Global batch `step`, or only its `rows` (a process's share; engine.process_rows)."""
    slots = self.slots if rows is None else [self.slots[r] for r in rows]
    wanted: dict[int, list[int]] = {}
    for c, j in slots:
      wanted.setdefault(c, []).append(step * self.quota[c] + j)
    rows = {c: self.streams[c].rows(indices) for c, indices in wanted.items()}
    nth = {c: iter(range(len(indices))) for c, indices in wanted.items()}
    order = [(c, next(nth[c])) for c, _ in slots]
    return {f: np.stack([rows[c][f][i] for c, i in order]) for f in FIELDS}

  def rows_per_epoch(self) -> list[list[int]]:
    return [s.rows_per_epoch for s in self.streams]

  def remember(self, rows_per_epoch: list[list[int]]):
    for stream, rows in zip(self.streams, rows_per_epoch):
      stream.remember(rows)

  def epoch_of(self, step: int) -> float:
    return self.streams[0].epochs(step * self.quota[0])


def iterate(batches: Batches, first: int, last: int, rows=None, threads: int = 2, put=None,
            ahead: int = 2):
  """Grain pipeline over steps [first, last): each element is this process's `rows` of one
  global batch, built by `threads` threads ahead of the trainer; with `put` (host batch ->
  device arrays), a further thread keeps `ahead` batches on the accelerator while the
  current step runs. Batches are a pure function of the step: any thread count gives the
  same ones."""
  ds = grain.MapDataset.range(first, last).map(lambda step: batches.batch(step, rows))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
  if put is not None:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds.map(put), prefetch_buffer_size=ahead)
  return iter(ds)


@dataclasses.dataclass
class Data:
  """What the trainer needs: the training batches and the seen/unseen evaluation streams."""
  train: Batches
  seen: DocStream
  unseen: DocStream
  vocab_size: int
  identity: dict        # tokenizer/catalog hashes and corpus names: checked on resume
  summary: str
  catalog: str | None = None   # the one corpus' catalog.sqlite (a run copies it), or
  sources: list = dataclasses.field(default_factory=list)   # [(id, key, title, group,
                                                            #   documents, tokens)]

  def trained_sources(self) -> np.ndarray:
    """Ids (as in training) of the sources whose documents the run trains on: not the
    held-out or excluded ones, whose sinks never learned anything."""
    return np.unique(np.concatenate([s.docs.source_ids[s.keep] for s in self.train.streams]))


def parse_refs(value: str) -> list[str]:
  """'a,b,c' or '@file' (one reference per line) -> references; '' -> []."""
  if not value:
    return []
  if value.startswith("@"):
    try:
      with open(value[1:]) as f:
        return [line.strip() for line in f if line.strip()]
    except OSError as e:
      raise UserError(f"cannot read source list {value[1:]}: {e.strerror}") from None
  return [v.strip() for v in value.split(",") if v.strip()]


def _builtin(cfg) -> Data:
  d = cfg.data
  need = synthetic.vocab_size(d.facts_per_source)
  if need > cfg.model.vocab_size:
    raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the "
                      f"built-in corpus' {need}")
  train = synthetic.generate(d.num_sources, d.facts_per_source, d.seed)
  val = synthetic.generate(d.val_sources, d.facts_per_source, d.seed + 1,
                           first_id=d.num_sources + 1)
  train_set = in_memory("builtin", train.docs, train.sources, need)
  refs = []   # the built-in corpus evaluates "unseen" on its generated validation sources,
  for field in ("holdout", "exclude"):   # so holdout and exclude both just leave training
    refs += [r.removeprefix("id:").strip() for r in parse_refs(d[field])]
    bad = [r for r in refs if not (r.isdigit() and 1 <= int(r) <= d.num_sources)]
    if bad:
      raise ConfigError(f"data.{field}", f"unknown built-in source(s) {bad[:5]}: built-in "
                        f"sources are ids 1..{d.num_sources} (N or id:N)")
  keep = ~np.isin(train_set.source_ids, np.asarray([int(r) for r in refs], np.int32))
  seen = DocStream(train_set, keep, d.seq_len, d.max_docs_per_row, cfg.seed)
  unseen = DocStream(in_memory("builtin-val", val.docs, val.sources, need), None, d.seq_len,
                     d.max_docs_per_row, cfg.seed)
  words = synthetic.words(d.facts_per_source)
  sources = [(int(i), f"person-{i}", synthetic.title(doc, words), None, 1, len(doc))
             for c in (train, val) for doc, i in zip(c.docs, c.sources)]
  return Data(Batches([seen], [1.0], cfg.train.batch_size), seen, unseen, need,
              {"corpus": "builtin"}, f"built-in corpus, {d.num_sources} sources to train on (ids 1-"
              f"{d.num_sources}) and {d.val_sources} held out for evaluation (ids "
              f"{d.num_sources + 1}-{d.num_sources + d.val_sources})",
              sources=sources)


def prepared_dir(spec: str, cfg, tokenizer: str | None = None) -> str:
  """Where the trainer keeps its own preparation of a raw corpus spec (with its own
  model.vocab_size tokenizer, or with `tokenizer`, another corpus' in a mixture)."""
  d = cfg.data
  name = "".join(c if c.isalnum() or c in "-._" else "_" for c in spec.strip("/"))
  tok = f"tok{tok_lib.load(tokenizer).sha256[:12]}" if tokenizer else f"bpe{cfg.model.vocab_size}"
  return os.path.join(d.dir or fetch.default_data_dir(), "prepared", f"{name}-{d.source_by}-{tok}")


def prepare(cfg, log=print):
  """Prepare every raw corpus the config names that is not prepared yet (the explicit step
  before training: `load` only opens prepared data). Later corpora of a mixture are
  tokenized with the first one's tokenizer."""
  import jax
  # lazily: a later corpus's directory is named by the first one's tokenizer, prepared by then
  for spec, _, out, shared in _locations(cfg, lambda *_: None):   # load says it
    if not (storage.path(out) / "manifest.json").exists():
      if jax.process_index() == 0:
        log(f"data: preparing {spec} into {out} (once)")
        prepare_lib.prepare(spec, out, vocab_size=cfg.model.vocab_size, tokenizer=shared,
                            source_by=cfg.data.source_by, data_dir=cfg.data.dir or None,
                            tfds_dir=cfg.data.tfds_dir or None, log=log)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"prepare {out}")


class Location(NamedTuple):
  spec: str              # the corpus as the config names it
  weight: float          # its share of a mixture's rows
  where: str             # its prepared data
  tokenizer: str | None  # the tokenizer it shares (a mixture's later corpora), else None


def _locations(cfg, log):
  """The Location of every raw corpus of a config, one at a time: prepared data is itself,
  anything else the trainer's preparation of it (prepared_dir); corpora after the first
  share the first one's tokenizer."""
  shared = None
  for spec, weight in _raw_specs(cfg, log):
    where = (spec if (storage.path(spec) / "manifest.json").exists()
             else prepared_dir(spec, cfg, shared))
    yield Location(spec, weight, where, shared)
    shared = shared or os.path.join(where, "tokenizer.model")


def _raw_specs(cfg, log) -> list[tuple[str, float]]:
  """The (spec, weight) corpora of a config; none for the built-in corpus (or its fallback)."""
  d = cfg.data
  specs = _corpus_specs(d.corpus)
  first = specs[0][0]
  if first == "builtin":
    return []
  if first in fetch.CORPORA and d.fallback == "builtin" and not os.path.exists(
      fetch.corpus_path(first, d.dir or None)):
    log(f"data: {first} has not been fetched ('sinkformer data fetch {first}'); training on the "
        "built-in synthetic corpus instead")
    return []
  return specs


def _corpus_specs(value: str) -> list[tuple[str, float]]:
  specs = []
  for part in value.split(","):
    spec, _, weight = part.strip().partition("@")
    try:
      specs.append((spec, float(weight) if weight else 1.0))
    except ValueError:
      raise ConfigError("data.corpus", f"bad weight in {part!r}: use SPEC@WEIGHT") from None
  return specs


def load(cfg, log=print) -> Data:
  """The data a config names, opened: built-in, a fetched or raw corpus once prepared (see
  `prepare`), prepared data, or a weighted mixture `a@3,b@1` (source ids of later corpora
  are offset past earlier ones). Never prepares: an unprepared corpus is an error."""
  d = cfg.data
  locations = list(_locations(cfg, log))   # all prepared by now
  if not locations:
    return _builtin(cfg)
  streams, identity, offset, hashes = [], {"corpora": []}, 0, set()
  for i, (spec, _, where, _) in enumerate(locations):
    if not (storage.path(where) / "manifest.json").exists():
      raise UserError(f"data: {spec} is not prepared; training prepares it, or run 'sinkformer "
                      f"data prepare --corpus {spec} --out DIR' and pass "
                      "--config.data.corpus=DIR")
    docs = open_prepared(where, d.reader, offset)
    m = docs.manifest
    hashes.add(m["tokenizer"]["sha256"])
    if d.tokenizer_hash and m["tokenizer"]["sha256"] != d.tokenizer_hash:
      raise ConfigError("data.tokenizer_hash", f"{docs.path} was tokenized with "
                        f"{m['tokenizer']['sha256']}, not {d.tokenizer_hash}")
    if len(hashes) > 1:
      raise ConfigError("data.corpus", "mixed corpora must share one tokenizer (prepare them "
                        "with --tokenizer of the first)")
    if docs.vocab_size > cfg.model.vocab_size:
      raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the "
                        f"tokenizer of {docs.path} ({docs.vocab_size}): train with "
                        f"--config.model.vocab_size={docs.vocab_size}, or prepare the corpus "
                        f"again with --vocab-size={cfg.model.vocab_size}")
    keep, held = _selection(docs, cfg)
    stream = DocStream(docs, keep, d.seq_len, d.max_docs_per_row, cfg.seed)
    if i == 0:
      seen = stream
      unseen = DocStream(docs, held, d.seq_len, d.max_docs_per_row, cfg.seed) if held.any() else None
    streams.append(stream)
    identity["corpora"].append({"path": docs.origin, "id_offset": offset,
                                "catalog_sha256": m["catalog_sha256"],
                                "corpus_sha256": m["corpus"]["sha256"]})
    offset += int(m["sources"])
  if unseen is None:
    raise ConfigError("data.val_sources", "no held-out sources to evaluate on: set "
                      "data.val_sources > 0 or data.holdout")
  identity["tokenizer_sha256"] = hashes.pop()
  summary = " + ".join(f"{s.docs.name} ({s.keep.sum():,} training docs"
                       + (f", weight {loc.weight:g})" if len(locations) > 1 else ")")
                       for s, loc in zip(streams, locations))
  summary += f"; {len(np.unique(unseen.docs.source_ids[unseen.keep]))} sources held out"
  catalogs = [os.path.join(s.docs.path, "catalog.sqlite") for s in streams]
  sources = [] if len(streams) == 1 else _mixture_sources(streams, catalogs)
  return Data(Batches(streams, [loc.weight for loc in locations], cfg.train.batch_size), seen, unseen,
              streams[0].docs.vocab_size, identity, summary,
              catalogs[0] if len(streams) == 1 else None, sources)


def _mixture_sources(streams, catalogs) -> list:
  """One catalog for a mixture: ids offset as in training, keys prefixed by the corpus."""
  rows = []
  for stream, path in zip(streams, catalogs):
    cat = catalog_lib.Catalog(path)
    rows += [(i + stream.docs.id_offset, f"{stream.docs.name}:{k}", *rest) for i, k, *rest in
             cat.db.execute("SELECT id, key, title, grp, documents, tokens FROM sources "
                            "ORDER BY id")]
    cat.close()
  return rows


def _selection(docs: DocSet, cfg) -> tuple[np.ndarray, np.ndarray]:
  """(documents to train on, held-out documents) after data.holdout/val_sources/exclude."""
  d = cfg.data
  cat = catalog_lib.Catalog(os.path.join(docs.path, "catalog.sqlite"))
  try:
    excluded, held = (np.asarray([r["id"] for r in cat.resolve(parse_refs(refs))], np.int32)
                      + docs.id_offset for refs in (d.exclude, d.holdout))
  finally:
    cat.close()
  ids = np.unique(docs.source_ids)
  # Drawn before exclusion: a retrain oracle (data.exclude = the forget set) holds out the
  # very sources its model held out, and trains on the model's documents minus the forget set.
  candidates = np.setdiff1d(ids, held)
  count = min(d.val_sources, len(candidates) - 1)
  if count > len(candidates) // 2:   # e.g. 64 of a 6-book corpus: training on 1 book
    raise ConfigError("data.val_sources", f"{d.val_sources} held-out sources would leave "
                      f"{len(candidates) - count} of {len(ids)} to train on; set it to at most "
                      f"{len(candidates) // 2} (half), or name them with data.holdout")
  drawn = np.random.default_rng((d.seed, 1)).choice(candidates, count, replace=False)
  held = np.concatenate([held, drawn])
  is_held = np.isin(docs.source_ids, held)
  return ~is_held & ~np.isin(docs.source_ids, excluded), is_held
