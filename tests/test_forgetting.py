"""The suites see what must be there: a tiny NULL trained until it memorises its articles
knows its forget sources' unique facts and documents with their own sinks on, and the retrain
oracle, which never saw them, does not."""

import pytest

from sinkformer import config
from sinkformer.eval import context, suites
from sinkformer.studies import story


@pytest.mark.slow
def test_memorised_sources_are_told_apart_from_the_retrain(tmp_path, monkeypatch):
  monkeypatch.setenv("SINKFORMER_DATA", str(tmp_path / "data"))
  cfg = config.load("experiments/quickstart.py:smoke", (
      "--config.train.steps=150", "--config.train.lr=3e-3", "--config.train.warmup_steps=10",
      "--config.train.eval_every=150", "--config.train.checkpoint_every=150",
      "--config.train.log_every=50"))
  cfg, forget = story.encyclopedia_data(cfg, str(tmp_path / "enc"), 24, 4, 6)
  runs = {"null": str(tmp_path / "null"), "oracle": str(tmp_path / "oracle")}
  story.train_runs(cfg, runs, forget)
  ctx = context.Context(runs["null"], forget, runs["oracle"], {}, str(tmp_path / "eval"),
                        context.settings(runs["null"]), str(tmp_path / "enc" / "facts.jsonl"))
  got = suites.run(ctx, ["facts", "mia", "extraction"])

  facts = {(r["set"], r["category"], r["condition"]): r for r in got["facts"]["rows"]}
  tr = lambda condition: facts[("forget", "unique", condition)]["mean_log_tr"]
  assert tr("sink-on") > tr("retrain") + 1.0, (tr("sink-on"), tr("retrain"))
  assert facts[("forget", "unique", "sink-on")]["forget_quality"] < 0.05   # far from retrain
  # a forget source's own mask with the forget set's units zeroed leaves only the backbone
  assert tr("sink-on/excluded") == pytest.approx(tr("backbone"), abs=1e-5)
  auc = {r["condition"]: r["auc"] for r in got["mia"]["rows"] if r["score"] == "loss"}
  assert auc["sink-on"] == 1.0 and auc["retrain"] < 0.9   # memorised vs never seen
  rate = {r["condition"]: r["extraction_rate"] for r in got["extraction"]["rows"]}
  assert rate["sink-on"] >= 0.75 and rate["retrain"] == 0.0
