"""A generated encyclopedia of fictional people with exact ground truth for every fact.

Each article (one source) states:
- *unique* facts: attributes of its person drawn at random (birth year, occupation, a book
  they wrote, a pet's name): stated in that article only;
- *shared* facts: facts about the person's home town (its river, its founding year), stated
  in every article of a person from that town, so several sources carry them;
- *inferred* facts: "the mentor of A was born in the year" is derivable from *other*
  articles only: the mentor's article says whom they taught and when they were born, A's
  article does not name its mentor. Forgetting A should leave them answerable, as a retrain
  without A's article still answers them.

Every fact comes with a cloze prompt (its sentence cut before the answer), the answer, a
paraphrased prompt and at least `distractors` wrong answers of the same type. Each article
also gives a verbatim passage (prefix / continuation) for extraction tests. Seeded: the same
arguments give the same encyclopedia, at any size.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["n", "r", "l", "s", "th", "m", "k", "nd"]
OCCUPATIONS = ["baker", "cartographer", "weaver", "glassblower", "astronomer", "shipwright",
               "beekeeper", "archivist", "tanner", "clockmaker", "herbalist", "stonemason",
               "violinist", "printer", "surveyor", "fisherman", "potter", "lamplighter",
               "bookbinder", "chemist", "falconer", "cooper", "engraver", "miller"]
ANIMALS = ["cat", "dog", "parrot", "tortoise", "goat", "owl", "ferret", "horse"]
WORDS = ["Silent", "Crimson", "Hollow", "Northern", "Broken", "Golden", "Distant", "Quiet",
         "Winter", "Salt", "Iron", "Glass", "Lantern", "Harbor", "Orchard", "River",
         "Garden", "Tower", "Letters", "Season", "Map", "Bridge", "Song", "Field"]


@dataclasses.dataclass
class Fact:
  source: str           # key of the article the probe is about
  category: str         # unique | shared | inferred
  relation: str
  prompt: str           # cloze: the answer completes it
  answer: str
  paraphrase: str       # the same question, other words
  distractors: list     # same-type wrong answers
  stated_in: list       # keys of every article that states the answer to this prompt


def _name(rng, capital=True) -> str:
  syllables = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.integers(1, 3))]
  word = "".join(syllables) + rng.choice(CODAS)
  return word.capitalize() if capital else word


def _distinct(rng, make, count: int, avoid=()) -> list:
  out, seen, misses = [], set(avoid), 0
  while len(out) < count:
    x = make()
    if x in seen:
      misses += 1
      if misses > 1000 + 100 * count:   # the space is (nearly) exhausted: never loop forever
        raise ValueError(f"cannot draw {count} distinct values (got {len(out)})")
      continue
    seen.add(x)
    out.append(x)
  return out


def generate(num_people: int, seed: int = 0, towns: int | None = None,
             distractors: int = 4) -> tuple[list[dict], list[Fact]]:
  """(articles as canonical JSONL records, facts)."""
  rng = np.random.default_rng(seed)
  towns = towns or max(2, num_people // 8)
  names = _distinct(rng, lambda: f"{_name(rng)} {_name(rng)}", num_people)
  town_names = _distinct(rng, lambda: _name(rng) + rng.choice(["ford", "wick", "ham", "by"]), towns)
  rivers = _distinct(rng, lambda: _name(rng), towns)
  founded = [int(y) for y in rng.integers(900, 1500, towns)]
  title = lambda: f"The {rng.choice(WORDS)} {rng.choice(WORDS)}"
  if num_people > len(WORDS) ** 2 * 7 // 10:   # too few two-word titles: name a place too
    books = _distinct(rng, lambda: f"{title()} of {_name(rng)}", num_people)
  else:
    books = _distinct(rng, title, num_people)
  pets = _distinct(rng, lambda: _name(rng), num_people)
  people = []
  for i, name in enumerate(names):
    mentor = int(rng.integers(num_people - 1))
    people.append({"key": f"person-{i:06d}", "name": name, "town": int(rng.integers(towns)),
                   "year": int(rng.integers(1700, 1950)), "job": str(rng.choice(OCCUPATIONS)),
                   "book": books[i], "pet": pets[i], "animal": str(rng.choice(ANIMALS)),
                   "mentor": mentor + (mentor >= i)})
  by_town = {}
  for p in people:
    by_town.setdefault(p["town"], []).append(p["key"])

  def pool(make, answer):
    return _distinct(rng, make, distractors, avoid=(answer,))

  students = {}
  for p in people:
    students.setdefault(p["mentor"], []).append(p["name"])
  articles, facts = [], []
  for i, p in enumerate(people):
    n, t, mentor = p["name"], p["town"], people[p["mentor"]]
    town = town_names[t]
    unique = [
        ("year", f"{n} was born in the year", str(p["year"]),
         f"The year of {n}'s birth was", lambda: str(rng.integers(1700, 1950))),
        ("occupation", f"{n} worked as a", p["job"], f"By trade, {n} was a",
         lambda: str(rng.choice(OCCUPATIONS))),
        ("book", f"{n} wrote a book called", p["book"], f"The book written by {n} is",
         lambda: f"The {rng.choice(WORDS)} {rng.choice(WORDS)}"),
        ("pet", f"{n} had a {p['animal']} named", p["pet"], f"The name of {n}'s {p['animal']} was",
         lambda: _name(rng)),
    ]
    shared = [
        ("river", f"{town} lies on the river", rivers[t], f"The river that flows through {town} is the",
         lambda: _name(rng)),
        ("founded", f"{town} was founded in the year", str(founded[t]),
         f"The founding year of {town} was", lambda: str(rng.integers(900, 1500))),
    ]
    sentences = [f"{n} was born in the year {p['year']} in {town}.",
                 f"{n} worked as a {p['job']}.", f"{n} wrote a book called {p['book']}.",
                 f"{n} had a {p['animal']} named {p['pet']}.",
                 f"{town} lies on the river {rivers[t]}.",
                 f"{town} was founded in the year {founded[t]}.",
                 *(f"{n} was the mentor of {s}." for s in students.get(i, []))]
    articles.append({"key": p["key"], "title": n, "text": " ".join(sentences),
                     "town": town})
    for relation, prompt, answer, paraphrase, make in unique:
      facts.append(Fact(p["key"], "unique", relation, prompt, answer, paraphrase,
                        pool(make, answer), [p["key"]]))
    for relation, prompt, answer, paraphrase, make in shared:
      facts.append(Fact(p["key"], "shared", relation, prompt, answer, paraphrase,
                        pool(make, answer), by_town[t]))
    year = str(mentor["year"])
    facts.append(Fact(p["key"], "inferred", "mentor_year", f"The mentor of {n} was born in the year",
                      year, f"{n}'s mentor was born in the year",
                      pool(lambda: str(rng.integers(1700, 1950)), year), [mentor["key"]]))
  return articles, facts


def passages(articles: list[dict], prefix: int = 32, continuation: int = 32) -> list[dict]:
  """Verbatim extraction probes: the first `prefix` words of an article and the next words."""
  out = []
  for a in articles:
    words = a["text"].split()
    if len(words) > prefix:
      out.append({"source": a["key"], "prefix": " ".join(words[:prefix]),
                  "continuation": " ".join(words[prefix:prefix + continuation])})
  return out


def write(out_dir: str, num_people: int, seed: int = 0) -> dict:
  """corpus.jsonl (prepare it like any corpus), facts.jsonl and passages.jsonl."""
  os.makedirs(out_dir, exist_ok=True)
  articles, facts = generate(num_people, seed)
  files = {"corpus": articles, "facts": [dataclasses.asdict(f) for f in facts],
           "passages": passages(articles, prefix=24, continuation=16)}
  for name, rows in files.items():
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return {name: len(rows) for name, rows in files.items()}
