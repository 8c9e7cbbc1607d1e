"""The generated encyclopedia: every probe's ground truth is where it claims to be."""

import json

from sinkformer.data import encyclopedia


def test_facts_are_stated_exactly_where_they_claim():
  articles, facts = encyclopedia.generate(40, seed=3)
  text = {a["key"]: a["text"] for a in articles}
  assert len(articles) == 40 and len(facts) == 40 * 7
  for f in facts:
    assert len(f.distractors) >= 4 and f.answer not in f.distractors
    assert len(set(f.distractors)) == len(f.distractors) and f.paraphrase != f.prompt
    if f.category == "unique":
      holders = [k for k, t in text.items() if f"{f.prompt} {f.answer}" in t]
      assert holders == [f.source] == f.stated_in
    elif f.category == "shared":
      holders = sorted(k for k, t in text.items() if f"{f.prompt} {f.answer}" in t)
      assert holders == sorted(f.stated_in) and f.source in holders
    else:   # inferred: derivable from the mentor's article alone, not from the subject's
      mentor_key = f.stated_in[0]
      assert mentor_key != f.source
      mentor_name = next(a["title"] for a in articles if a["key"] == mentor_key)
      student = next(a["title"] for a in articles if a["key"] == f.source)
      assert f"{mentor_name} was the mentor of {student}." in text[mentor_key]
      assert f"{mentor_name} was born in the year {f.answer}" in text[mentor_key]
      # the subject's own article states neither link nor year
      assert f"was the mentor of {student}." not in text[f.source]
      assert f"{mentor_name} was born" not in text[f.source]
  shared_sizes = [len(f.stated_in) for f in facts if f.category == "shared"]
  assert max(shared_sizes) >= 3   # shared facts really are repeated across sources


def test_seeded_and_written_as_a_corpus(tmp_path):
  assert encyclopedia.generate(10, seed=1) == encyclopedia.generate(10, seed=1)
  assert encyclopedia.generate(10, seed=1)[0] != encyclopedia.generate(10, seed=2)[0]
  counts = encyclopedia.write(str(tmp_path), 12, seed=0)
  assert counts == {"corpus": 12, "facts": 84, "passages": 12}
  first = json.loads((tmp_path / "corpus.jsonl").read_text().splitlines()[0])
  assert {"key", "title", "text"} <= set(first)
  p = json.loads((tmp_path / "passages.jsonl").read_text().splitlines()[0])
  assert first["text"].startswith(p["prefix"] + " " + p["continuation"])


def test_large_encyclopedias_have_distinct_titles():
  """More people than two-word book titles (24 x 24) still get one each, and the small
  encyclopedias every run was trained on are unchanged."""
  _, facts = encyclopedia.generate(1600, seed=0)
  books = [f.answer for f in facts if f.relation == "book"]
  assert len(books) == len(set(books)) == 1600
  small = [f.answer for f in encyclopedia.generate(400, seed=0)[1] if f.relation == "book"]
  assert all(" of " not in b and len(b.split()) == 3 for b in small)
