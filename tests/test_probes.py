"""Vital-article probes: the n-gram scan separates unique from shared sentences, clozes cut
before the answer, distractors come from the same topic."""

import json

import pytest

from sinkformer.data import probes
from sinkformer.errors import UserError

SHARED = "The river that runs through the old town is called the willow"


def article(key, topic, description, *sentences):
  return {"key": key, "title": key.title(), "text": " ".join(sentences),
          "description": description, "topic": topic}


def corpus():
  fillers = ["apple", "bridge", "candle", "dragon", "engine", "forest", "garden", "harbor"]
  records = []
  for i, word in enumerate(fillers):
    unique = f"Alpha{i} beta{i} gamma{i} delta{i} epsilon{i} zeta{i} eta{i} theta{i} owns a {word}."
    extra = [SHARED + "."] if i < 2 else []
    # shares one 5-gram with article 0 only: partly shared, skipped
    partial = [f"Iota{i} kappa{i} lambda{i} mu{i} nu{i} xi{i} in the old town is called quietly."]
    records.append(article(f"a{i}", "Places" if i < 6 else "People", f"Description {i}",
                           unique, *extra, *(partial if i == 3 else [])))
  return records


def test_unique_and_shared_sentences_by_ngram_overlap():
  found, counts = probes.build(corpus())
  by = lambda category: [p for p in found if p["category"] == category]
  shared = by("shared")
  assert {p["source"] for p in shared} == {"a0", "a1"}
  assert all(p["prompt"] == SHARED.rsplit(" ", 1)[0] and p["answer"] == "willow" for p in shared)
  assert sorted(shared[0]["stated_in"]) == ["a0", "a1"]
  unique = by("unique")
  # the 2 People articles' sentences have too few same-topic answers to draw distractors from
  assert {p["answer"] for p in unique} == {"apple", "bridge", "candle", "dragon", "engine", "forest"}
  assert counts["sentence skipped: too few same-topic distractors"] == 2
  assert all(p["stated_in"] == [p["source"]] for p in unique)
  assert counts["sentence skipped: partly shared"] == 1
  for p in unique:   # distractors: other same-topic answers, never the answer itself
    assert len(p["distractors"]) == probes.DISTRACTORS and p["answer"] not in p["distractors"]
    assert set(p["distractors"]) <= {"apple", "bridge", "candle", "dragon", "engine", "forest",
                                     "willow"}
  described = by("description")
  assert len(described) == 6   # the 2 People articles have too few same-topic distractors
  assert counts["description skipped: too few same-topic distractors"] == 2
  assert described[0]["prompt"] == "A0:" and described[0]["answer"] == "Description 0"


def test_bad_input_is_reported(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text(json.dumps(article("a", "t", "d", "x.")) + "\n{broken\n")
  with pytest.raises(UserError, match=r"c.jsonl:2: malformed line"):
    probes.write(str(path), str(tmp_path / "p.jsonl"))
  path.write_text(json.dumps({"key": "a", "title": "A", "text": "x y."}) + "\n")
  with pytest.raises(UserError, match="no 'description'/'topic' metadata"):
    probes.write(str(path), str(tmp_path / "p.jsonl"))
  with pytest.raises(UserError, match="sinkformer data fetch wiki-vital"):
    probes.write(str(tmp_path / "missing.jsonl"), str(tmp_path / "p.jsonl"))


def test_cli_writes_probes_the_facts_suite_reads(tmp_path):
  import subprocess
  import sys
  from sinkformer.eval import context
  path = tmp_path / "c.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in corpus()))
  out = subprocess.run([sys.executable, "-m", "sinkformer", "data", "probes", "--corpus",
                        str(path), "--out", str(tmp_path / "p.jsonl")], capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "6 unique" in out.stdout and "2 shared" in out.stdout and "6 description" in out.stdout
  facts = context.load_facts(str(tmp_path / "p.jsonl"))
  assert context.categories(facts) == ["description", "unique", "shared"]
