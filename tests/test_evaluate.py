"""Every eval suite end to end on a tiny run: encyclopedia -> NULL -> oracle -> dense -> NPO
-> tables, plots and the one-page summary."""

import json
import subprocess
import sys

import numpy as np
import pytest


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
  for r in result["rows"]:   # properties a mix-up of items, logs or sets would break
    assert r["mean_tr"] >= np.exp(r["mean_log_tr"]) - 1e-9   # AM-GM over the same items
    assert r["log_tr_ci_lo"] <= r["mean_log_tr"] <= r["log_tr_ci_hi"]
    assert 0 < r["tofu_tr"] <= 1 if r["set"] == "forget" else 0 <= r["tofu_tr"] < 1
    assert r["mean_log_tr_paraphrase"] is not None   # the encyclopedia paraphrases questions
    assert (r["forget_quality_sources"] is None) == (r["condition"] == "retrain")
  assert {r["sources"] for r in forget_unique} == {3}
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
  assert mia["documents"] == {"forget": 3, "holdout": 6, "tokens_at_most": 128}   # seq_len
  for r in mia["rows"]:
    assert r["auc_lo"] <= r["auc"] <= r["auc_hi"]
    if r["condition"] == "retrain":   # against itself: no gap, no leak, nothing to judge
      assert r["gap"] == 0 and r["privleak"] in (0, None) and r["retrain_like"] is None
    else:   # the gap and PrivLeak point the same way: a forget set that looks trained on
      assert r["gap_lo"] <= r["gap"] <= r["gap_hi"]
      if r["gap"] and r["privleak"] == r["privleak"]:
        assert np.sign(r["privleak"]) == -np.sign(r["gap"])
      assert r["retrain_like"] == (r["gap_lo"] <= 0 <= r["gap_hi"])   # no second retrain

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
    row = next(r for r in gcg["rows"] if r["condition"] == name)
    assert row["memorised"] <= row["found"] and row["median_acr"] in (0.0, 1.5, 3.0)
    assert (row["median_acr"] > 0) == (row["found"] >= 2 / 3)   # failures count as 0

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
  assert relearn["documents"] == {"finetune": 1, "choose": 1, "measured": 1,
                                  "measured_facts": 7}
  assert relearn["split"] == "across"   # one document per person: sources against sources
  for label, curve in relearn["curves"].items():   # rate chosen on B, reported on C
    final = relearn["final_nll_per_rate"][label]
    assert len(final) == 3
    best = min(final, key=lambda lr: final[lr]["choose"])
    assert float(best) == relearn["lr"][label] and curve["nll"][-1] == final[best]["report"]
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
  models = ("null sink-off/exclude", "null sink-off/route", "null backbone", "dense")
  assert set(rows) == {(m, k) for m in models
                       for k in ("cloze_accuracy", "cloze_log_tr", "held_out_nll")}
  for r in rows.values():   # a paired difference's CI holds its estimate; no second control
    assert (r["vs_dense"] is None) == (r["model"] == "dense") and r["vs_dense_active"] is None
    if r["vs_dense"]:
      mean, lo, hi = (float(x) for x in r["vs_dense"].replace("[", "").replace("]", "")
                      .replace(",", "").split())
      assert lo <= mean <= hi
  assert set(cap["perplexity"]) == set(models)
  page = (run / "eval" / "index.md").read_text()   # every suite's table, in the registry's order
  from sinkformer.eval import suites
  at = [page.index((run / "eval" / f"{name}.md").read_text()) for name in suites.SUITES]
  assert at == sorted(at)
