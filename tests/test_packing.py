"""Packing keeps every token's source; the stream is a pure function of the step."""

import numpy as np

from sinkformer import packing, synthetic


def docs(*lengths):
  return [np.arange(10 * i, 10 * i + n, dtype=np.int32) for i, n in enumerate(lengths)]


def test_pack_fields():
  rows = packing.pack(docs(3, 4, 5), [7, 8, 9], seq_len=8, max_docs=4)
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 0],
                                                      [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["source_ids"][0], [7, 7, 7, 8, 8, 8, 8, 0])
  np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(rows["targets"][0, :3], [1, 2, 0])
  # no target across a document boundary, none on padding
  np.testing.assert_array_equal(rows["loss_mask"][0], [1, 1, 0, 1, 1, 1, 0, 0])


def test_long_documents_become_windows_that_keep_their_source():
  rows = packing.pack(docs(20), [5], seq_len=8, max_docs=2)
  assert (rows["source_ids"][rows["segment_ids"] > 0] == 5).all()
  assert rows["loss_mask"].sum() == 7 + 7 + 3
  np.testing.assert_array_equal(rows["positions"][1], np.arange(8))


def test_max_docs_per_row_is_respected():
  rows = packing.pack(docs(*[1] * 10), list(range(1, 11)), seq_len=64, max_docs=3)
  assert rows["segment_ids"].max() == 3 and len(rows["tokens"]) == 4


def test_stream_batches_are_a_pure_function_of_the_step():
  corpus = synthetic.generate(50, 3, seed=0)
  rows = packing.pack(corpus.docs, corpus.sources, 32, 4)
  a, b = packing.Stream(rows, 4, seed=1), packing.Stream(rows, 4, seed=1)
  for step in (7, 0, 3, 7):
    np.testing.assert_array_equal(a.batch(step)["tokens"], b.batch(step)["tokens"])
  # two process slices put together are the global batch
  halves = [a.batch(5, 0, 2), a.batch(5, 2, 4)]
  np.testing.assert_array_equal(np.concatenate([h["source_ids"] for h in halves]),
                                a.batch(5)["source_ids"])


def test_every_row_once_per_epoch_in_a_new_order():
  rows = {f: np.arange(12)[:, None] for f in packing.FIELDS}
  s = packing.Stream(rows, 4, seed=0)
  epoch0 = np.concatenate([s.batch(i)["tokens"][:, 0] for i in range(3)])
  epoch1 = np.concatenate([s.batch(i)["tokens"][:, 0] for i in range(3, 6)])
  assert sorted(epoch0) == sorted(epoch1) == list(range(12))
  assert list(epoch0) != list(epoch1)


def test_builtin_corpus_has_unique_and_shared_facts():
  c = synthetic.generate(200, 3, seed=0)
  assert list(c.sources) == list(range(1, 201))
  assert max(int(d.max()) for d in c.docs) < c.vocab_size
  # city -> river is the same in every article of a city (shared); values vary (unique)
  pairs = {(int(d[4]), int(d[8])) for d in c.docs}
  assert len({city for city, _ in pairs}) == len(pairs)
  assert len({int(d[13]) for d in c.docs}) > 50   # first unique value
  assert synthetic.generate(200, 3, seed=0).docs[5].tolist() == c.docs[5].tolist()
