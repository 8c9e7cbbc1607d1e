"""`sinkformer eval --suite facts`: Truth Ratios of probe facts under every condition, side
by side, against the retrain oracle (method.md sections 2-4).

Conditions (the forget set F is treated as unlearned; the run's own switchboard is not
changed):
  sink-on            each fact's own source's sinks (the "knows it" reference)
  sink-off/exclude   the nearest surviving source's sinks, F's units zeroed (deployed)
  sink-off/route     the nearest surviving source's sinks, nothing zeroed
  backbone           no sinks
  placebo            the farthest surviving source's sinks, F's units zeroed
  retrain            the oracle (same config, seed and order, F never seen), sink-off/exclude
  dense              the dense control, if given
"""

from __future__ import annotations

import json
import os

import numpy as np

from sinkformer import generate, metrics, serving, sinks
from sinkformer.errors import UserError

CATEGORIES = ("unique", "shared", "inferred")


def load_facts(path: str) -> list[dict]:
  try:
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  except OSError as e:
    raise UserError(f"cannot read probes {path}: {e.strerror} (make them with 'sinkformer data "
                    "encyclopedia')") from None


class Scorer:
  """Length-normalised answer log-probabilities of one run under one condition."""

  def __init__(self, run_dir: str, forget_keys: list[str]):
    self.server = serving.Server(run_dir)
    board = self.server.board
    self.forget = np.asarray([r["id"] for r in board.resolve(forget_keys)], np.int32)
    spec = self.server.setup.spec
    self.exclude = None
    if spec is not None:
      base = self.server.excluder.exclusion("exclude")
      extra = sinks.exclusion(spec, self.forget)
      self.exclude = sinks.Exclusion(base.mlp | np.asarray(extra.mlp),
                                     None if base.attn is None else base.attn | np.asarray(extra.attn))
      self.none = sinks.Exclusion(np.zeros_like(base.mlp),
                                  None if base.attn is None else np.zeros_like(base.attn))

  def ids(self, keys: list[str]) -> np.ndarray:
    cat = self.server.board.catalog
    return np.asarray([cat.get(k)["id"] for k in keys], np.int32)

  def routed(self, prompts: list[str], farthest: bool = False) -> np.ndarray:
    alive = self.server._alive() & ~np.isin(self.server.router.ids, self.forget)
    queries = serving.Router.embed(self.server.setup, self.server.params,
                                   [self.server.encode(p) for p in prompts])
    return self.server.router.rank(queries, alive, farthest)

  def mean_logprobs(self, prompts, answers, row_sources, mode: str, exclude) -> np.ndarray:
    tok = self.server.tokenizer
    p = [self.server.encode(x) for x in prompts]
    a = [tok.encode(x) for x in answers]
    total = generate.score(self.server.setup, self.server.params, p, a, row_sources, exclude, mode)
    return total / np.asarray([len(x) for x in a])


def _truth_ratios(scorer: Scorer, facts, sources, mode, exclude) -> np.ndarray:
  """TR per fact: all (prompt, candidate) pairs scored in one batched pass."""
  prompts, answers, rows = [], [], []
  for f, s in zip(facts, sources):
    for candidate in [f["answer"], *f["distractors"]]:
      prompts.append(f["prompt"])
      answers.append(candidate)
      rows.append(s)
  lp = scorer.mean_logprobs(prompts, answers, np.asarray(rows, np.int32), mode, exclude)
  per = lp.reshape(len(facts), -1)
  return metrics.truth_ratio(per[:, 0], per[:, 1:])


def facts_suite(run_dir: str, facts_path: str, forget: list[str], oracle_dir: str | None,
                dense_dir: str | None, out_dir: str, retained: int = 200) -> dict:
  facts = load_facts(facts_path)
  if oracle_dir is None or not os.path.exists(os.path.join(oracle_dir, "config.json")):
    raise UserError("the facts suite compares with the retrain oracle; make it with: "
                    f"sinkformer oracle --run {run_dir} --forget {','.join(forget[:3])}... "
                    "--workdir ORACLE_DIR, then pass --oracle ORACLE_DIR")
  run = Scorer(run_dir, forget)
  forget_keys = {run.server.board.catalog.get(k)["key"] for k in forget}
  items = [f for f in facts if f["source"] in forget_keys]
  kept = [f for f in facts if f["source"] not in forget_keys][:retained]
  if not items:
    raise UserError(f"no probe in {facts_path} is about the forget set")
  sets = {"forget": items, "retained": kept}
  conditions = {
      "sink-on": lambda s, fs: _truth_ratios(s, fs, s.ids([f["source"] for f in fs]), "source", s.none),
      "sink-off/exclude": lambda s, fs: _truth_ratios(s, fs, s.routed([f["prompt"] for f in fs]),
                                                      "source", s.exclude),
      "sink-off/route": lambda s, fs: _truth_ratios(s, fs, s.routed([f["prompt"] for f in fs]),
                                                    "source", s.none),
      "backbone": lambda s, fs: _truth_ratios(s, fs, np.zeros(len(fs), np.int32), "backbone",
                                              s.exclude),
      "placebo": lambda s, fs: _truth_ratios(s, fs, s.routed([f["prompt"] for f in fs], True),
                                             "source", s.exclude),
  }
  tr = {}
  for name, fn in conditions.items():
    tr[name] = {split: fn(run, fs) for split, fs in sets.items()}
  oracle = Scorer(oracle_dir, forget)
  tr["retrain"] = {split: conditions["sink-off/exclude"](oracle, fs) for split, fs in sets.items()}
  if dense_dir:
    dense = Scorer(dense_dir, forget)
    tr["dense"] = {split: _truth_ratios(dense, fs, np.zeros(len(fs), np.int32), "dense", None)
                   for split, fs in sets.items()}

  table = []
  for split, fs in sets.items():
    for category in CATEGORIES:
      mask = np.asarray([f["category"] == category for f in fs])
      if not mask.any():
        continue
      for name, by_split in tr.items():
        values = by_split[split][mask]
        row = {"set": split, "category": category, "condition": name, "n": int(mask.sum()),
               "mean_log_tr": float(np.mean(np.log(values))), "mean_tr": float(np.mean(values))}
        if name != "retrain":
          row["forget_quality"] = metrics.forget_quality(values, tr["retrain"][split][mask])
        table.append(row)
  result = {"run": run_dir, "oracle": oracle_dir, "dense": dense_dir, "forget": sorted(forget_keys),
            "policy_note": "sink-off/exclude zeroes F's units; sink-off/route does not",
            "rows": table,
            "truth_ratios": {c: {s: v.tolist() for s, v in d.items()} for c, d in tr.items()}}
  _write(out_dir, result, tr, sets)
  return result


def _write(out_dir: str, result: dict, tr: dict, sets: dict):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "facts.json"), "w") as f:
    json.dump(result, f, indent=1)
  lines = ["| set | category | condition | n | mean log TR | mean TR | forget quality (KS p vs retrain) |",
           "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    fq = f"{r['forget_quality']:.3g}" if "forget_quality" in r else "-"
    lines.append(f"| {r['set']} | {r['category']} | {r['condition']} | {r['n']} | "
                 f"{r['mean_log_tr']:.3f} | {r['mean_tr']:.3f} | {fq} |")
  with open(os.path.join(out_dir, "facts.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(sets), len(CATEGORIES), figsize=(5 * len(CATEGORIES), 4 * len(sets)),
                           squeeze=False)
  for i, (split, fs) in enumerate(sets.items()):
    for j, category in enumerate(CATEGORIES):
      mask = np.asarray([f["category"] == category for f in fs])
      ax = axes[i][j]
      if mask.any():
        ax.boxplot([np.log(tr[c][split][mask]) for c in tr], showfliers=False)
        ax.set_xticks(range(1, len(tr) + 1), list(tr), rotation=45, ha="right", fontsize=8)
      ax.axhline(0, color="grey", lw=0.5)
      ax.set_title(f"{split} / {category}: log Truth Ratio")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "facts_truth_ratio.png"), dpi=100)
  plt.close(fig)
  print("\n".join(lines))
