"""Every eval suite end to end on a tiny run: encyclopedia -> NULL -> oracle -> dense -> NPO
-> tables, plots and the one-page summary."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sinkformer.eval import metrics

FORGET = "person-000001,person-000002,person-000003"


def cli(*args, env_dir):
  import os
  env = {**os.environ, "SINKFORMER_DATA": str(env_dir)}
  return subprocess.run([sys.executable, "-m", "sinkformer", *args], capture_output=True,
                        text=True, timeout=600, env=env)


@pytest.mark.slow
def test_oracle_and_facts_suite(tmp_path):
  enc, run, oracle = tmp_path / "enc", tmp_path / "run", tmp_path / "oracle"
  assert cli("data", "encyclopedia", "--people", "60", "--out", str(enc), env_dir=tmp_path).returncode == 0
  train = ("--config", "experiments/quickstart.py:smoke", f"--config.data.corpus={enc}/corpus.jsonl",
           "--config.data.val_sources=6", "--config.train.steps=6")
  out = cli("train", *train, "--workdir", str(run), env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  args = ("--run", str(run), "--facts", f"{enc}/facts.jsonl", "--forget", FORGET)
  missing = cli("eval", *args, env_dir=tmp_path)
  assert missing.returncode == 2 and "sinkformer oracle --run" in missing.stderr

  out = cli("oracle", "--run", str(run), "--forget", FORGET, "--workdir", str(oracle), env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  assert (oracle / "forget.txt").read_text().split() == [f"key:{k}" for k in FORGET.split(",")]
  seen = set()
  for line in (oracle / "sources.jsonl").read_text().splitlines():
    seen |= set(json.loads(line)["source_id"])
  assert seen and not seen & {2, 3, 4}   # the forget sources (ids 2-4) never trained

  out = cli("eval", *args, "--oracle", str(oracle), env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  result = json.loads((run / "eval" / "facts.json").read_text())
  conditions = {r["condition"] for r in result["rows"]}
  assert conditions == {"sink-on", "sink-on/excluded", "sink-off/exclude", "sink-off/route",
                        "backbone", "all-mlp-off", "placebo", "retrain"}
  forget_unique = [r for r in result["rows"] if r["set"] == "forget" and r["category"] == "unique"]
  assert {r["n"] for r in forget_unique} == {12}   # 3 sources x 4 unique facts
  # a retained person whose mentor is forgotten: their inferred fact is the forget set's
  probes = [json.loads(x) for x in (enc / "facts.jsonl").read_text().splitlines()]
  forget = set(FORGET.split(","))
  orphaned = sum(f["category"] == "inferred" and set(f["stated_in"]) <= forget for f in probes)
  assert orphaned and sum(result["skipped"].values()) == orphaned
  forget_inferred = [f for f in probes if f["category"] == "inferred" and f["source"] in forget
                     and not set(f["stated_in"]) <= forget]
  assert {r["n"] for r in result["rows"] if r["set"] == "forget"
          and r["category"] == "inferred"} == {len(forget_inferred)}
  assert [r["forget_quality"] for r in forget_unique if r["condition"] == "retrain"] == [None]
  unique = np.asarray(result["categories"]["forget"]) == "unique"
  retrain_trs = np.asarray(result["truth_ratios"]["retrain"]["forget"])[unique]
  for r in forget_unique:   # the row's figures are on the row's own items, against the retrain's
    trs = np.asarray(result["truth_ratios"][r["condition"]]["forget"])[unique]
    assert r["tofu_tr"] == pytest.approx(metrics.tofu_forget(trs))
    assert r["mean_tr"] == pytest.approx(trs.mean())
    assert r["mean_log_tr"] == pytest.approx(np.log(trs).mean())
    if r["condition"] != "retrain":
      assert r["forget_quality"] == pytest.approx(metrics.forget_quality(trs, retrain_trs))
  assert (run / "eval" / "facts_truth_ratio.png").stat().st_size > 10_000
  assert "| forget | unique | sink-on |" in (run / "eval" / "facts.md").read_text()

  for suite, column in (("mia", "privleak"), ("extraction", "extraction_rate")):
    out = cli("eval", "--suite", suite, "--run", str(run), "--forget", FORGET, "--oracle",
              str(oracle), env_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads((run / "eval" / f"{suite}.json").read_text())["rows"]
    assert {r["condition"] for r in rows} == conditions and all(column in r for r in rows)
  extraction = json.loads((run / "eval" / "extraction.json").read_text())["rows"]
  for r in extraction:   # greedy and teacher-forced decoding agree where they must
    assert r["first_token_agrees"] == 1.0
    assert r["exact_memorization"] >= r["extraction_strength"]   # a right suffix is right
  mia = json.loads((run / "eval" / "mia.json").read_text())
  assert mia["documents"] == {"forget": 3, "holdout": 6}
  retrain = {r["score"]: r["muse_auc"] for r in mia["rows"] if r["condition"] == "retrain"}
  for r in mia["rows"]:   # MUSE's orientation and formula, row by row
    assert r["muse_auc"] == pytest.approx(1 - r["auc"])
    if retrain[r["score"]] > 0:
      assert r["privleak"] == pytest.approx(
          100 * (r["muse_auc"] - retrain[r["score"]]) / retrain[r["score"]])

  bench = cli("bench", "probes", "--run", str(run), "--facts", f"{enc}/facts.jsonl", "--count",
              "50", env_dir=tmp_path)
  assert bench.returncode == 0 and json.loads(bench.stdout.splitlines()[-1])["probes"] == 50

  bad = cli("eval", "--suite", "gcg", "--run", str(run), "--forget", FORGET, "--oracle",
            str(oracle), "--set", "gcg.stepz=3", env_dir=tmp_path)
  assert bad.returncode == 2 and "gcg.steps" in bad.stderr
  bad = cli("eval", "--suite", "relearn", "--run", str(run), "--forget", FORGET, "--oracle",
            str(oracle), "--set", "relearn.mask=weights", env_dir=tmp_path)
  assert bad.returncode == 2 and "eval.relearn.mask" in bad.stderr
  out = cli("eval", "--suite", "gcg", "--run", str(run), "--forget", FORGET, "--oracle",
            str(oracle), "--set", "gcg.lengths=(2, 4)", "--set", "gcg.target_len=6",
            "--set", "gcg.steps=2", "--set", "gcg.candidates=8", env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  gcg = json.loads((run / "eval" / "gcg.json").read_text())
  assert gcg["budget"]["lengths"] == [2, 4] and gcg["budget"]["steps"] == 2
  assert {r["condition"] for r in gcg["rows"]} == {"sink-on", "sink-off/exclude",
                                                   "sink-off/route", "backbone", "retrain"}
  for name, acr in gcg["acr"].items():   # found at length L: ACR = 6 / L
    assert len(acr) == 3 and all(a in (None, 3.0, 1.5) for a in acr)
    row = next(r for r in gcg["rows"] if r["condition"] == name)   # failures count as 0
    assert row["median_acr"] == sorted(a or 0.0 for a in acr)[1]
    assert row["memorised"] == sum(a is not None and a > 1 for a in acr) / 3

  # the dense control, an NPO copy of it, and the relearning attack on everything
  dense, npo = tmp_path / "dense", tmp_path / "npo"
  out = cli("train", *train[:1], "experiments/quickstart.py:smoke,dense", *train[2:],
            "--workdir", str(dense), env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  out = cli("posthoc", "--run", str(dense), "--forget", FORGET, "--method", "npo", "--epochs", "2",
            "--workdir", str(npo), env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  assert "npo step 2/2" in out.stdout   # 3 forget documents = one batch of 8 per epoch
  out = cli("eval", "--suite", "relearn", "--run", str(run), "--forget", FORGET, "--oracle",
            str(oracle), "--dense", str(dense), "--posthoc", f"npo={npo}", "--set",
            "relearn.steps=2", "--facts", f"{enc}/facts.jsonl", env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  relearn = json.loads((run / "eval" / "relearn.json").read_text())
  assert set(relearn["curves"]) == {"sink-off/exclude", "retrain", "dense", "npo"}
  assert relearn["documents"] == {"finetune": 2, "measured": 1, "measured_facts": 7}
  assert relearn["split"] == "across"   # one document per person: sources against sources
  for label, curve in relearn["curves"].items():   # the attacker's best rate, per model
    sweep = relearn["sweep_final_nll"][label]
    assert len(sweep) == 3 and curve["nll"][-1] == min(sweep.values())
    assert sweep[str(relearn["lr"][label])] == curve["nll"][-1]
  for curve in relearn["curves"].values():   # NLL and each category's log TR, steps 0..2
    assert set(curve) == {"nll", "log_tr/unique", "log_tr/shared", "log_tr/inferred"}
    assert all(len(values) == 3 for values in curve.values())
  out = cli("eval", "--suite", "relearn", "--run", str(run), "--forget", FORGET, "--oracle",
            str(oracle), "--set", "relearn.steps=1", "--set", "relearn.mask=sink-on",
            "--out", str(tmp_path / "sink-on"), env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  sink_on = json.loads((tmp_path / "sink-on" / "relearn.json").read_text())
  assert set(sink_on["curves"]) == {"sink-on", "retrain"}
  assert sink_on["attack_mask"].startswith("sink-on")

  # capability: NULL vs dense on world-fact clozes and held-out documents
  missing = cli("eval", "--suite", "capability", "--run", str(run), "--dense", str(dense),
                env_dir=tmp_path)
  assert missing.returncode == 2 and "sinkformer data fetch questions-words" in missing.stderr
  words = tmp_path / "questions-words.jsonl"
  words.write_text("".join(json.dumps({"key": f"capital-world/{i}", "text": line,
                                       "group": "capital-world"}) + "\n" for i, line in enumerate(
      ["Athens Greece Oslo Norway", "Paris France Rome Italy", "Lima Peru Cairo Egypt"])))
  out = cli("eval", "--suite", "capability", "--run", str(run), "--dense", str(dense),
            "--clozes", str(words), env_dir=tmp_path)
  assert out.returncode == 0, out.stderr
  cap = json.loads((run / "eval" / "capability.json").read_text())
  assert cap["documents"] == {"held_out": 6, "clozes": 6, "clozes_skipped": None}
  rows = {(r["model"], r["metric"]): r for r in cap["rows"]}
  assert set(rows) == {(m, k) for m in ("null sink-off/exclude", "null backbone", "dense")
                       for k in ("cloze_accuracy", "cloze_log_tr", "held_out_nll")}
  for r in rows.values():   # paired over the same items: the mean difference is the difference
    assert (r["vs_dense"] is None) == (r["model"] == "dense")
    if r["vs_dense"]:
      dense = rows[("dense", r["metric"])]["mean"]
      assert float(r["vs_dense"].split()[0]) == pytest.approx(r["mean"] - dense, abs=1e-4)
  assert set(cap["perplexity"]) == {"null sink-off/exclude", "null backbone", "dense"}
  page = (run / "eval" / "index.md").read_text()   # every suite's table, in the registry's order
  from sinkformer.eval import suites
  at = [page.index((run / "eval" / f"{name}.md").read_text()) for name in suites.SUITES]
  assert at == sorted(at)
