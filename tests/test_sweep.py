"""`sinkformer sweep`: the regime map's smallest grid end to end, and its point specs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sinkformer import config
from sinkformer.errors import UserError
from sinkformer.studies import story, sweep


def test_points_parse_and_apply_to_the_right_sections():
  label, overrides = sweep.parse_point("G/I=6%: model.mlp_backbone=32, sinks.num=480, "
                                       "sweep.articles=100, train.lr=1e-3")
  assert label == "G/I=6%"
  assert overrides == {"model.mlp_backbone": "32", "sinks.num": "480", "sweep.articles": "100",
                       "train.lr": "1e-3"}   # as written: parsed with each field's type
  cfg = config.load("experiments/regimes.py")
  c, settings = sweep.point_config(cfg, overrides)
  assert (c.model.mlp_backbone, c.sinks.num, c.train.lr) == (32, 480, 1e-3)
  assert settings["articles"] == 100
  assert "sweep" not in c and cfg.model.mlp_backbone == 96   # the centre is untouched
  for bad in ("x: sinks.k", "x: =4"):
    with pytest.raises(UserError, match=r"not \[SECTION.\]FIELD=VALUE"):
      sweep.parse_point(bad)
  seeded = sweep.point_config(cfg, sweep.parse_point("s: seed=1")[1])[0]   # a top-level field
  assert seeded.seed == 1 and cfg.seed == 0
  nested = sweep.point_config(cfg, sweep.parse_point("dp: train.dp.noise=2.0")[1])[0]
  assert nested.train.dp.noise == 2.0 and cfg.train.dp.noise == 0.0
  with pytest.raises(UserError, match="unknown config field 'train.dp.nois'; nearest: train.dp.noise"):
    sweep.point_config(cfg, {"train.dp.nois": 2.0})
  with pytest.raises(UserError, match="distinct as directory names"):
    points = "('passes/4: train.steps=40', 'passes*4: train.steps=640')"
    sweep.run(config.load("experiments/regimes.py", (f"--config.sweep.points={points}",)),
              "/nonexistent")
  with pytest.raises(UserError, match="no comma"):
    sweep.parse_point("a, b: sinks.k=4")
  with pytest.raises(UserError, match="unknown config field 'sinks.kk'; nearest: sinks.k"):
    sweep.point_config(cfg, {"sinks.kk": 4})
  with pytest.raises(UserError, match="sinks.k=four: invalid literal for int"):
    sweep.point_config(cfg, {"sinks.k": "four"})
  with pytest.raises(UserError, match="train.steps=2.5: invalid literal for int"):
    sweep.point_config(cfg, {"train.steps": 2.5})   # refused, never truncated
  # the dense control depends on the MLP's width, not on how it splits into G and P
  centre, _ = sweep.point_config(cfg, {})
  split = sweep.point_config(cfg, {"model.mlp_backbone": 32, "sinks.num": 480})[0]
  assert sweep.dense_key(split) == sweep.dense_key(centre)
  assert sweep.dense_key(sweep.point_config(cfg, {"sinks.k": 4})[0]) == sweep.dense_key(centre)
  assert sweep.dense_key(sweep.point_config(cfg, {"train.steps": 40})[0]) != sweep.dense_key(centre)
  # the active-matched control is G + k wide: k changes it, the G/P split does not
  active = lambda c: sweep.dense_key(story.variant(c, "dense_active", []))
  assert active(centre) != sweep.dense_key(story.variant(centre, "dense", []))
  assert active(sweep.point_config(cfg, {"sinks.k": 4})[0]) != active(centre)
  assert active(sweep.point_config(cfg, {"sinks.num": 480})[0]) == active(centre)


def test_the_scale_map_plots_its_source_axis_and_no_variant():
  scale = config.load("experiments/scale.py")
  rows = []
  for spec in scale.sweep.points:
    label, overrides = sweep.parse_point(spec)
    rows.append({"point": label, "corpus": "encyclopedia", "source_size": 1,
                 "overrides": overrides})
  plotted = {r["point"] for r in sweep.along_sources(rows)}
  assert {"400 x7", "400 x1.5", "1600 x7", "6400 x1.5", "20000 x1.5"} <= plotted
  assert not any("dp" in p or "one a row" in p for p in plotted)   # layout variants are not
  measured = [{"point": p, "passes": x} for p, x in (("400 x1.5", 1.5), ("1600 x1.5", 1.4),
                                                    ("400 x7", 7.0), ("1600 x7", 6.7))]
  assert [[r["point"] for r in g] for g in sweep.pass_groups(measured)] == [
      ["1600 x1.5", "400 x1.5"], ["1600 x7", "400 x7"]]


@pytest.mark.slow
def test_smallest_grid_trains_measures_and_resumes(tmp_path):
  env = {**os.environ, "SINKFORMER_DATA": str(tmp_path / "data")}
  work = tmp_path / "sweep"
  args = [sys.executable, "-m", "sinkformer", "sweep", "--config", "experiments/regimes.py:smoke",
          "--workdir", str(work)]
  out = subprocess.run(args, capture_output=True, text=True, timeout=1200, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((work / "regimes.json").read_text())
  assert [r["point"] for r in rows] == ["centre", "k=2"]
  assert [r["k/P"] for r in rows] == [8 / 96, 2 / 96]
  for r in rows:   # properties of each point's figures
    assert r["auc_ci/sink-off/exclude"][0] <= r["auc/sink-off/exclude"] <= r["auc_ci/sink-off/exclude"][1]
    lo, hi = r["gap_ci/sink-off/exclude"]
    assert lo <= r["auc/sink-off/exclude"] - r["auc/retrain"] <= hi
    assert r["noise_floor"] == pytest.approx(abs(r["auc/retrain-2"] - r["auc/retrain"]))
    if r["retrain_like/sink-off/exclude"]:   # the verdict needs both tests
      assert r["ks_unique/sink-off/exclude"] >= 0.05 and lo <= r["noise_floor"]
    assert np.sign(r["nll_cost"]) == np.sign(float(r["nll_vs_dense/null sink-off/exclude"].split()[0]))
    assert r["relearn/sink-off/exclude"] is not None and r["relearn/retrain"] is not None
    assert 0 < r["passes"] and (r["capacity_lost"] > 0) == (r["forget"] > 0)
  # the total-matched control serves both points; the active-matched one is G + k wide: one each
  assert len(os.listdir(work / "dense")) == 3
  page = (work / "index.md").read_text()
  assert (work / "regimes.md").read_text() in page and "| k=2 |" in page

  again = subprocess.run(args + ["--points", "k=2"], capture_output=True, text=True,
                         timeout=600, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "=== train" not in again.stdout   # every run and result is reused
  assert json.loads((work / "regimes.json").read_text()) == rows   # the page keeps both points
  bad = subprocess.run(args + ["--points", "k=3"], capture_output=True, text=True, timeout=600,
                       env=env)
  assert bad.returncode == 2 and "not among centre, k=2" in bad.stderr


def test_books_group_articles_into_sources_and_their_facts(tmp_path):
  cfg = config.load("experiments/regimes.py:smoke")
  c, s = sweep.point_config(cfg, {"sweep.source_size": 4, "sweep.forget": 2, "sweep.holdout": 3})
  c, forget, facts_path = sweep.corpus(c, s, str(tmp_path))
  assert c.data.source_by == "group" and forget == ["book-00000", "book-00001"]
  holdout = open(c.data.holdout.removeprefix("@")).read().split()
  assert holdout == ["book-00007", "book-00008", "book-00009"]   # 40 articles, 10 books
  records = [json.loads(x) for x in open(c.data.corpus)]
  book = {r["key"]: r["group"] for r in records}
  assert [book[f"person-{i:06d}"] for i in (0, 3, 4, 39)] == ["book-00000", "book-00000",
                                                              "book-00001", "book-00009"]
  people = [json.loads(x) for x in open(tmp_path / "encyclopedia-40-seed0" / "facts.jsonl")]
  books = [json.loads(x) for x in open(facts_path)]
  assert len(books) == len(people)
  for p, b in zip(people, books):
    assert b["source"] == book[p["source"]] and b["answer"] == p["answer"]
    assert b["stated_in"] == list(dict.fromkeys(book[k] for k in p["stated_in"]))
  with pytest.raises(UserError, match="must divide"):
    sweep.corpus(c, {**s, "source_size": 3}, str(tmp_path))
  with pytest.raises(UserError, match="exceed the 10 sources"):
    sweep.corpus(c, {**s, "forget": 5, "holdout": 6}, str(tmp_path))
