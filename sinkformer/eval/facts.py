"""`sinkformer eval --suite facts`: Truth Ratios of probe facts about the forget set (what
was forgotten) and about other sources (what forgetting cost them), every condition against
the retrain oracle."""

from __future__ import annotations

import collections
import os

import numpy as np

from sinkformer.errors import UserError
from sinkformer.eval import metrics
from sinkformer.eval.context import (Context, categories, fact_truth_ratios, load_facts, pyplot,
                                     write_table)


def facts_suite(ctx: Context, retained: int = 100) -> dict:
  """Truth Ratios of the forget set's facts and of up to `retained` facts per category about
  other sources (what unlearning costs them), every condition vs the retrain oracle.

  A fact stated only by forget sources (`stated_in`) is left out of every category but
  "unique": a shared or inferred fact nobody else states is unique in fact, and a retained
  source's fact stated only in the forget set is the forget set's (both counted in
  `skipped`)."""
  if not ctx.probes:
    raise UserError("--suite facts needs --facts FILE (from 'sinkformer data encyclopedia' or "
                    "'sinkformer data probes')")
  facts = load_facts(ctx.probes)
  forget_keys = ctx.forget_keys()
  forgotten_only = lambda f: bool(f.get("stated_in")) and set(f["stated_in"]) <= forget_keys
  skipped = collections.Counter()
  items, kept, per_category = [], [], collections.Counter()
  for f in facts:
    if f["category"] != "unique" and forgotten_only(f):
      skipped[("forget" if f["source"] in forget_keys else "retained") + "/" + f["category"]] += 1
    elif f["source"] in forget_keys:
      items.append(f)
    elif per_category[f["category"]] < retained:
      per_category[f["category"]] += 1
      kept.append(f)
  if not items:
    raise UserError(f"no probe in {ctx.probes} is about the forget set")
  sets = {"forget": items, "retained": kept}
  paraphrased = all(f.get("paraphrase") for f in items + kept)
  tr, tr_para = {}, {}
  for name, scorer in ctx.conditions():
    tr[name] = {split: fact_truth_ratios(scorer, name, fs) for split, fs in sets.items()}
    if paraphrased:   # TOFU asks the question in other words
      tr_para[name] = {split: fact_truth_ratios(
          scorer, name, [dict(f, prompt=f["paraphrase"]) for f in fs]) for split, fs in sets.items()}

  table = []
  for split, fs in sets.items():
    sources = np.asarray([f["source"] for f in fs])
    for category in categories(facts):
      mask = np.asarray([f["category"] == category for f in fs])
      if not mask.any():
        continue
      for name, by_split in tr.items():
        values = by_split[split][mask]
        lo, hi = metrics.bootstrap_ci(np.log(values), groups=sources[mask])
        aggregate = metrics.tofu_forget if split == "forget" else metrics.tofu_retain
        row = {"set": split, "category": category, "condition": name, "n": int(mask.sum()),
               "sources": len(set(sources[mask])),
               "mean_log_tr": float(np.mean(np.log(values))), "log_tr_ci_lo": lo,
               "log_tr_ci_hi": hi, "mean_tr": float(np.mean(values)),
               "tofu_tr": aggregate(values), "forget_quality": None,
               "forget_quality_sources": None, "mean_log_tr_paraphrase": None}
        if tr_para:
          row["mean_log_tr_paraphrase"] = float(np.mean(np.log(tr_para[name][split][mask])))
        if name != "retrain":
          retrain = tr["retrain"][split][mask]
          row["forget_quality"] = metrics.forget_quality(values, retrain)
          row["forget_quality_sources"] = metrics.forget_quality(
              *(_per_source(np.log(v), sources[mask]) for v in (values, retrain)))
        table.append(row)
  result = {"run": ctx.run, "oracle": ctx.oracle, "others": ctx.others, "probes": ctx.probes,
            "forget": sorted(forget_keys), "skipped": dict(skipped),
            "policy_note": "sink-off/exclude zeroes F's units; sink-off/route does not",
            "tr_note": ("mean_log_tr: the mean of log TR over items, with a 95% bootstrap CI "
                        "drawing whole sources (a source's facts are not independent); "
                        "mean_tr: the mean of TR (how the paper's TR of about 1.9 reads); "
                        "tofu_tr: TOFU's aggregate, mean(min(R, 1/R)) on the forget set and "
                        "mean(max(0, 1 - R)) on retained facts, R = 1/TR; forget_quality: "
                        "the two-sided KS p-value against the retrain over the row's n items, "
                        "forget_quality_sources over per-source means (independent units); "
                        "mean_log_tr_paraphrase: the question asked in other words (TOFU)"),
            "rows": table,
            "truth_ratios": {c: {s: v.tolist() for s, v in d.items()} for c, d in tr.items()},
            "categories": {split: [f["category"] for f in fs] for split, fs in sets.items()}}
  write_table(ctx.out, "facts", result, ["set", "category", "condition", "n", "sources",
                                         "mean_log_tr", "log_tr_ci_lo", "log_tr_ci_hi",
                                         "mean_log_tr_paraphrase", "mean_tr", "tofu_tr",
                                         "forget_quality", "forget_quality_sources"])
  _plot_truth_ratios(ctx.out, tr, sets, categories(facts))
  return result


def _per_source(values, sources) -> np.ndarray:
  """The mean of `values` per source (in order of first appearance)."""
  order = list(dict.fromkeys(sources))
  return np.asarray([values[sources == s].mean() for s in order])


def _plot_truth_ratios(out_dir: str, tr: dict, sets: dict, cats: list[str]):
  plt = pyplot()
  fig, axes = plt.subplots(len(sets), len(cats), figsize=(5 * len(cats), 4 * len(sets)),
                           squeeze=False)
  for i, (split, fs) in enumerate(sets.items()):
    for j, category in enumerate(cats):
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
