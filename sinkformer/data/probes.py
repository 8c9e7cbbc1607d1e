"""Probe facts from real Wikipedia Vital Articles (`sinkformer data probes`), in the format of
the encyclopedia's facts (`source`, `category`, `prompt`, `answer`, `distractors`, ...).

- *description*: "TITLE:" -> the article's Wikidata description, against the descriptions of
  other articles of the same Vital topic. The description is metadata, not article text: it
  probes what the model knows about the entity, not a sentence it read.
- *unique* / *shared*: a sentence of an article cut before its last word (the answer), with
  the last words of other same-topic probes (capitalised like the answer) as distractors. Which sentences are stated in
  several articles is found by an n-gram overlap scan: every lower-cased word NGRAM-gram of
  the corpus is mapped to the articles containing it; a sentence is
  - *shared* when at least SHARED_FRACTION of its n-grams, including the one that ends with
    the answer, occur in another article (those articles are its `stated_in`), and
  - *unique* when none of its n-grams occurs in any other article;
  sentences in between are ambiguous and skipped. On wiki-vital (n = 5, fraction 0.5) that
  gives 19,074 unique and 230 shared probes (and 9,862 description probes); 10,253 sentences
  are partly shared and skipped.
"""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np

from sinkformer.errors import UserError

NGRAM = 5
SHARED_FRACTION = 0.5
MIN_CONTEXT = 8       # words before the answer, so the cloze is answerable
DISTRACTORS = 4
WORD = re.compile(r"[\w']+")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
ANSWER = re.compile(r"^(.*\S)\s+([A-Za-z][a-z]{3,})[.!?]$")   # last word: a plain word, 4+ letters


def _records(path: str) -> list[dict]:
  rows = []
  try:
    with open(path) as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          rows.append(json.loads(line))
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror} (fetch it with 'sinkformer data fetch "
                    "wiki-vital')") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{number}: malformed line: {e.msg}") from None
  return rows


def _grams(text: str) -> list[tuple]:
  words = WORD.findall(text.lower())
  return [tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)]


def _owners(records) -> dict:
  """n-gram -> up to two article indices containing it (two are enough to call it shared)."""
  owners = collections.defaultdict(list)
  for i, r in enumerate(records):
    for g in set(_grams(r["text"])):
      if len(owners[g]) < 2:
        owners[g].append(i)
  return owners


def _distractors(rng, pool: list[str], answer: str) -> list[str] | None:
  choices = [x for x in dict.fromkeys(pool) if x.lower() != answer.lower()]
  if len(choices) < DISTRACTORS:
    return None
  return [choices[i] for i in rng.choice(len(choices), DISTRACTORS, replace=False)]


def build(records: list[dict], seed: int = 0) -> tuple[list[dict], collections.Counter]:
  """(probes, counts of what was kept and skipped) from canonical JSONL records with
  `description` and `topic` metadata."""
  rng = np.random.default_rng(seed)
  owners = _owners(records)
  counts = collections.Counter()
  sentences = []   # (record index, category, prompt, answer, stated_in)
  for i, r in enumerate(records):
    for sentence in SENTENCE.split(r["text"]):
      m = ANSWER.match(sentence.strip())
      grams = _grams(sentence)
      if not m or len(WORD.findall(m.group(1))) < MIN_CONTEXT or not grams:
        counts["sentence skipped: no plain last word or too short"] += 1
        continue
      elsewhere = [[j for j in owners[g] if j != i] for g in grams]
      shared = sum(bool(e) for e in elsewhere) / len(grams)
      if shared == 0:
        sentences.append((i, "unique", m.group(1), m.group(2), []))
      elif shared >= SHARED_FRACTION and elsewhere[-1]:
        stated = sorted({records[j]["key"] for e in elsewhere for j in e})
        sentences.append((i, "shared", m.group(1), m.group(2), stated))
      else:
        counts["sentence skipped: partly shared"] += 1

  by_topic = collections.defaultdict(list)
  for r in records:
    if r.get("description"):
      by_topic[r.get("topic", "")].append(r["description"])
  answers = collections.defaultdict(list)   # same topic, same capitalisation
  kind = lambda i, answer: (records[i].get("topic", ""), answer[0].isupper())
  for i, _, _, answer, _ in sentences:
    answers[kind(i, answer)].append(answer)

  probes = []
  for r in records:
    if not r.get("description"):
      counts["description skipped: none"] += 1
      continue
    wrong = _distractors(rng, by_topic[r.get("topic", "")], r["description"])
    if wrong is None:
      counts["description skipped: too few same-topic distractors"] += 1
      continue
    probes.append({"source": r["key"], "category": "description", "relation": "description",
                   "prompt": f"{r['title']}:", "answer": r["description"],
                   "distractors": wrong, "stated_in": []})
  for i, category, prompt, answer, stated in sentences:
    r = records[i]
    wrong = _distractors(rng, answers[kind(i, answer)], answer)
    if wrong is None:
      counts["sentence skipped: too few same-topic distractors"] += 1
      continue
    probes.append({"source": r["key"], "category": category, "relation": "last word",
                   "prompt": prompt, "answer": answer, "distractors": wrong,
                   "stated_in": [r["key"], *stated]})
  counts.update(p["category"] for p in probes)
  return probes, counts


def write(corpus: str, out: str, seed: int = 0) -> collections.Counter:
  records = _records(corpus)
  missing = [r.get("key") for r in records if "description" not in r or "topic" not in r]
  if missing and len(missing) == len(records):
    raise UserError(f"{corpus} has no 'description'/'topic' metadata: probes need "
                    "wiki-vital ('sinkformer data fetch wiki-vital')")
  probes, counts = build(records, seed)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".partial", "w") as f:
    for p in probes:
      f.write(json.dumps(p) + "\n")
  os.replace(out + ".partial", out)
  return counts
