"""The stream: every token keeps its source; batches are a pure function of the step."""

import numpy as np
import pytest

from sinkformer.data import pipeline, synthetic
from sinkformer.errors import ConfigError, UserError


def docs(*lengths):
  return [np.arange(10 * i, 10 * i + n, dtype=np.int32) for i, n in enumerate(lengths)]


def stream(lengths, sources=None, seq_len=8, max_docs=4, keep=None, seed=0):
  d = docs(*lengths)
  sources = list(range(1, len(d) + 1)) if sources is None else sources
  return pipeline.DocStream(pipeline.in_memory("t", d, sources, 100), keep, seq_len, max_docs, seed)


def all_rows(s, epoch=0):
  before = sum(s.epoch_rows(e) for e in range(epoch))
  return s.rows(before + np.arange(s.epoch_rows(epoch)))


def test_assemble_fields():
  rows = pipeline.assemble([[(np.arange(3), 7), (np.arange(10, 14), 8)], [(np.arange(5), 9)]], 8)
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 0],
                                                      [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["source_ids"][0], [7, 7, 7, 8, 8, 8, 8, 0])
  np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(rows["targets"][0, :3], [1, 2, 0])
  # no target across a document boundary, none on padding
  np.testing.assert_array_equal(rows["loss_mask"][0], [1, 1, 0, 1, 1, 1, 0, 0])


def test_long_documents_become_windows_that_keep_their_source():
  rows = all_rows(stream([20], [5], seq_len=8, max_docs=2))
  assert (rows["source_ids"][rows["segment_ids"] > 0] == 5).all()
  assert rows["loss_mask"].sum() == 7 + 7 + 3
  assert sorted(rows["tokens"][rows["segment_ids"] > 0].tolist()) == list(range(20))


def test_rows_are_full_and_respect_max_docs():
  s = stream([1] * 10, seq_len=64, max_docs=3)
  rows = all_rows(s)
  assert rows["segment_ids"].max() == 3 and len(rows["tokens"]) == 4
  rows = all_rows(stream([3] * 12, seq_len=8, max_docs=8))
  assert len(rows["tokens"]) == 6   # two 3-token docs per 8-token row, greedy in order


def test_every_document_once_per_epoch_in_a_new_order():
  s = stream([1] * 12, seq_len=1, max_docs=1)
  epoch0, epoch1 = (all_rows(s, e)["source_ids"][:, 0] for e in (0, 1))
  assert sorted(epoch0) == sorted(epoch1) == list(range(1, 13))
  assert list(epoch0) != list(epoch1)


def test_batches_are_a_pure_function_of_the_step_and_slices_compose():
  corpus = synthetic.generate(50, 3, seed=0)
  make = lambda: pipeline.Batches([pipeline.DocStream(pipeline.in_memory("b", corpus.docs, corpus.sources, 300),
                                              None, 32, 4, seed=1)], [1.0], 4)
  a, b = make(), make()
  for step in (7, 0, 30, 7):   # 30 is a few epochs in; b is a fresh object (a resumed run)
    np.testing.assert_array_equal(a.batch(step)["tokens"], b.batch(step)["tokens"])
  halves = [a.batch(5, np.arange(0, 2)), a.batch(5, np.arange(2, 4))]
  np.testing.assert_array_equal(np.concatenate([h["source_ids"] for h in halves]),
                                a.batch(5)["source_ids"])


def test_excluding_sources_keeps_the_order_of_the_rest():
  full = stream([4] * 30, seq_len=4, max_docs=1)
  keep = ~np.isin(np.arange(1, 31), [3, 17, 22])
  oracle = stream([4] * 30, seq_len=4, max_docs=1, keep=keep)
  for epoch in (0, 1):
    order = all_rows(full, epoch)["source_ids"][:, 0]
    np.testing.assert_array_equal(all_rows(oracle, epoch)["source_ids"][:, 0],
                                  order[~np.isin(order, [3, 17, 22])])


def test_mixture_quota_and_order():
  a = stream([2] * 40, list(range(1, 41)), seq_len=2, max_docs=1)
  b = stream([2] * 40, list(range(101, 141)), seq_len=2, max_docs=1)
  mix = pipeline.Batches([a, b], [3, 1], batch_size=8)
  assert mix.quota.tolist() == [6, 2]
  ids = np.concatenate([mix.batch(s)["source_ids"][:, 0] for s in range(3)])
  from_a = ids[ids < 100]
  np.testing.assert_array_equal(from_a, a.rows(np.arange(18))["source_ids"][:, 0])
  with pytest.raises(ConfigError, match="weights"):
    pipeline.Batches([a, b], [100, 1], batch_size=8)


def test_grain_pipeline_matches_direct_batches_for_any_thread_count():
  corpus = synthetic.generate(40, 3, seed=0)
  make = lambda: pipeline.Batches([pipeline.DocStream(pipeline.in_memory("g", corpus.docs, corpus.sources,
                                                              300), None, 32, 4, seed=0)], [1.0], 4)
  reference = make()
  for threads in (1, 4):   # fresh streams: threads race to plan the epochs (rows 20-63)
    got = [b["tokens"] for b in pipeline.iterate(make(), 5, 16, np.arange(4), threads=threads)]
    for step, tokens in zip(range(5, 16), got, strict=True):
      np.testing.assert_array_equal(tokens, reference.batch(step)["tokens"])


def test_builtin_exclusion_and_unknown_ids(smoke_cfg):
  smoke_cfg.data.exclude = "1,2,3"
  d = pipeline.load(smoke_cfg)
  seen = d.seen.rows(np.arange(d.seen.epoch_rows(0)))["source_ids"]
  assert not np.isin(seen, [1, 2, 3]).any() and np.isin(seen, [4]).any()
  smoke_cfg.data.exclude = "9999"
  with pytest.raises(ConfigError, match="unknown built-in source"):
    pipeline.load(smoke_cfg)


def test_parse_refs(tmp_path):
  (tmp_path / "forget.txt").write_text("Alan Turing\n\n42\n")
  assert pipeline.parse_refs("a, b,,c") == ["a", "b", "c"]
  assert pipeline.parse_refs(f"@{tmp_path}/forget.txt") == ["Alan Turing", "42"]
  with pytest.raises(UserError, match="cannot read source list"):
    pipeline.parse_refs(f"@{tmp_path}/missing.txt")


def test_builtin_corpus_has_unique_and_shared_facts():
  c = synthetic.generate(200, 3, seed=0)
  assert list(c.sources) == list(range(1, 201))
  assert max(int(d.max()) for d in c.docs) < c.vocab_size
  # city -> river is the same in every article of a city (shared); values vary (unique)
  pairs = {(int(d[4]), int(d[8])) for d in c.docs}
  assert len({city for city, _ in pairs}) == len(pairs)
  assert len({int(d[13]) for d in c.docs}) > 50   # first unique value
  assert synthetic.generate(200, 3, seed=0).docs[5].tolist() == c.docs[5].tolist()


def test_the_packing_plan_equals_the_greedy_loop_it_replaces():
  rng = np.random.default_rng(0)
  for seq_len, max_docs in ((8, 4), (128, 16), (64, 1)):
    lengths = rng.integers(1, 3 * seq_len, 3000)
    order = rng.permutation(3000)
    doc, offset, length, starts = pipeline.pack_plan(order, lengths[order], seq_len, max_docs)
    want, s = [], 0                                   # next-fit, one row at a time
    while s < len(length):
      want.append(s)
      used, n = 0, 0
      while s < len(length) and n < max_docs and (used + length[s] <= seq_len or n == 0):
        used, n, s = used + length[s], n + 1, s + 1
    np.testing.assert_array_equal(starts, want + [len(length)])
    assert (length <= seq_len).all() and length.sum() == lengths.sum()


def test_a_resumed_stream_plans_only_the_epochs_it_reads():
  corpus = synthetic.generate(60, 3, seed=0)
  make = lambda: pipeline.DocStream(pipeline.in_memory("r", corpus.docs, corpus.sources, 300),
                                    None, 32, 4, seed=0)
  first = make()
  late = sum(first.epoch_rows(e) for e in range(7)) + 3       # a row in epoch 7
  want = first.rows(late + np.arange(4))
  resumed = make()
  resumed.remember(first.rows_per_epoch)
  got = resumed.rows(late + np.arange(4))
  assert list(resumed._plans) == [7]
  for field in pipeline.FIELDS:
    np.testing.assert_array_equal(got[field], want[field])


def test_the_device_prefetch_yields_what_the_host_built():
  corpus = synthetic.generate(40, 3, seed=0)
  batches = pipeline.Batches([pipeline.DocStream(pipeline.in_memory("p", corpus.docs, corpus.sources,
                                                                    300), None, 32, 4, seed=0)], [1.0], 4)
  put = lambda b: {k: np.asarray(v) * 1 for k, v in b.items()}   # stands in for device_put
  got = list(pipeline.iterate(batches, 2, 9, np.arange(4), threads=2, put=put, ahead=3))
  assert len(got) == 7
  for step, b in zip(range(2, 9), got):
    np.testing.assert_array_equal(b["tokens"], batches.batch(step)["tokens"])
