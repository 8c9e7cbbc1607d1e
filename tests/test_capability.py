"""Capability clozes from questions-words: sentences, same-relation distractors, bad input."""

import json

import pytest

from sinkformer.errors import UserError
from sinkformer.eval import capability

CAPITALS = ["Athens Greece", "Oslo Norway", "Paris France", "Rome Italy", "Lima Peru",
            "Cairo Egypt"]


def write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_clozes_ask_each_pair_with_same_relation_distractors(tmp_path):
  rows = [{"key": f"capital-world/{i}", "group": "capital-world",
           "text": f"{CAPITALS[i]} {CAPITALS[(i + 1) % 6]}"} for i in range(6)]
  rows += [{"key": "currency/1", "group": "currency", "text": "Japan yen Korea won"},
           {"key": "gram3-comparative/1", "group": "gram3-comparative", "text": "bad worse big bigger"},
           {"key": "capital-world/x", "group": "capital-world", "text": "too short"}]
  items = capability.clozes(write(tmp_path / "q.jsonl", rows), 100)
  assert len(items) == 6   # currency has 2 answers: too few for 4 distractors; gram3 unused
  capitals = {c.split()[0] for c in CAPITALS}
  for item in items:
    country = item["prompt"].removeprefix("The capital of ").removesuffix(" is")
    assert f"{item['answer']} {country}" in CAPITALS
    assert len(item["distractors"]) == 4 and set(item["distractors"]) <= capitals - {item["answer"]}
  assert capability.clozes(str(tmp_path / "q.jsonl"), 3) == items[:3]   # seeded, any size


def test_bad_questions_words_files_are_reported(tmp_path):
  with pytest.raises(UserError, match="sinkformer data fetch questions-words"):
    capability.clozes(str(tmp_path / "missing.jsonl"), 10)
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"group": "family", "text": "boy girl man woman"}) + "\n{oops\n")
  with pytest.raises(UserError, match=r"bad.jsonl:2: malformed line"):
    capability.clozes(str(path), 10)
  with pytest.raises(UserError, match="no questions-words sections"):
    capability.clozes(write(tmp_path / "other.jsonl", [{"group": "x", "text": "a b c d"}]), 10)
