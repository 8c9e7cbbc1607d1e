"""Attacks on an unlearned model, every condition side by side with the retrain oracle:
relearning (`sinkformer eval --suite relearn`) and GCG extraction scored by
the adversarial compression ratio (`--suite gcg`). Budgets come from the run's `eval`
config section (`--set relearn.steps=20`, `--set gcg.steps=100`, ... override them).
"""

from __future__ import annotations

import numpy as np

from sinkformer.errors import UserError
from sinkformer.eval import gcg, metrics, posthoc
from sinkformer.eval.context import (Context, categories, doc_condition, fact_truth_ratios,
                                     load_facts, pyplot, write_table)


def relearn_split(docs, split: str):
  """(documents to fine-tune on, documents to choose the rate on, documents to report on,
  the split used) of forget documents [(source id, tokens)]. "within": every source with
  three or more documents (a book's chapters) gives every third to each part, so the attack
  relearns a source from part of it (the paper's design); "across": every third source goes
  to each part (relearning sources from others); "auto": within when some source has three
  documents, else across."""
  by_source = {}
  for doc in docs:
    by_source.setdefault(doc[0], []).append(doc)
  if split == "auto":
    split = "within" if any(len(d) > 2 for d in by_source.values()) else "across"
  if split == "within":
    parts = [[d for ds in by_source.values() if len(ds) > 2 for d in ds[i::3]] for i in range(3)]
    if not parts[2]:
      raise UserError("no forget source has three documents to split: use --set "
                      "relearn.split=across")
  else:
    sources = list(by_source)
    parts = [[d for src in sources[i::3] for d in by_source[src]] for i in range(3)]
    if not parts[2]:
      raise UserError("the across-sources relearning attack needs at least three forget "
                      "sources (to fine-tune on, to choose the rate on, to report on)")
  return (*parts, split)


def relearn_suite(ctx: Context) -> dict:
  """Fine-tune each model on part of the forget documents (A, relearn_split) for
  `relearn.steps` steps at every rate of `relearn.lrs`, and after each step measure the
  mean token NLL of two other parts: B, on which the attacker picks its rate (the lowest
  final NLL: a strong attacker, since at too high a rate fine-tuning only damages a model),
  and C, on which the result is reported (a rate chosen on the documents it is scored on
  would flatter the attack). With probe facts, also the mean log Truth Ratio of C's
  sources' facts. Every rate's final NLL on B and C is in the result.

  The mask active while the attacker fine-tunes (and while B and C are measured) is
  `relearn.mask` for the NULL and the oracle: sink-off/exclude (default: the deployed path,
  forget units zeroed, so they get no gradient), sink-off/route, sink-on (the forget sources'
  own masks: an attacker holding the weights and the seeded mask function) or backbone.
  The dense control and post-hoc copies are attacked through their only path.
  """
  s = ctx.settings.relearn
  conditions = ctx.conditions([s.mask])
  docs = ctx.documents(ctx.seq_len())[0]
  part_a, part_b, part_c, split = relearn_split(docs, s.split)
  cat = conditions[0][1].server.board.catalog
  measured = {cat.get(src)["key"] for src, _ in part_c}
  if split == "across":
    measured -= {cat.get(src)["key"] for src, _ in part_a + part_b}
  facts = [f for f in load_facts(ctx.probes) if f["source"] in measured] if ctx.probes else []

  curves, chosen, final = {}, {}, {}
  for label, scorer in conditions:
    name = s.mask if label.startswith("retrain") else label   # oracles: the NULL's mask
    batches = {}
    for part, docs_ in (("a", part_a), ("b", part_b), ("c", part_c)):
      sources, mode, exclude = doc_condition(scorer, name, docs_)
      batches[part] = posthoc.rows([list(t) for _, t in docs_], sources, 8)
    runs = {lr: _relearn(scorer, name, batches, facts, lr, s.steps, mode, exclude)
            for lr in s.lrs}
    final[label] = {str(lr): {"choose": run["choose"][-1], "report": run["nll"][-1]}
                    for lr, run in runs.items()}
    chosen[label] = min(runs, key=lambda lr: runs[lr]["choose"][-1])
    curves[label] = {k: v for k, v in runs[chosen[label]].items() if k != "choose"}

  rows = []
  for label, curve in curves.items():
    for metric, values in curve.items():
      rows.append({"condition": label, "lr": chosen[label], "metric": metric,
                   "before": values[0], "after": values[-1], "change": values[-1] - values[0]})
  result = {"run": ctx.run, "oracle": ctx.oracle, "steps": s.steps, "lrs": list(s.lrs),
            "lr": chosen, "final_nll_per_rate": final, "split": split,
            "attack_mask": f"{s.mask} for the NULL and the oracle; own path otherwise",
            "documents": {"finetune": len(part_a), "choose": len(part_b),
                          "measured": len(part_c), "measured_facts": len(facts)},
            "curves": curves, "rows": rows}
  write_table(ctx.out, "relearn", result, ["condition", "lr", "metric", "before", "after",
                                           "change"])
  _plot_curves(ctx.out, curves, s.mask, chosen)
  return result


def _relearn(scorer, name, batches, facts, lr, steps, mode, exclude) -> dict:
  """One fine-tune at `lr` on A: the curves, from step 0, of B's NLL ("choose"), C's NLL
  ("nll") and C's facts' log TR."""
  tuner = posthoc.Finetuner(scorer.server.setup, scorer.server.params, "relearn", lr,
                            mode=mode, exclude=exclude)
  curve = {}

  def measure():
    for key, part in (("choose", "b"), ("nll", "c")):
      curve.setdefault(key, []).append(
          posthoc.nll(scorer.server.setup, tuner.params, batches[part], mode, exclude))
    if facts:
      tr = fact_truth_ratios(scorer, name, facts, tuner.params)
      for category in categories(facts):
        mask = np.asarray([f["category"] == category for f in facts])
        curve.setdefault(f"log_tr/{category}", []).append(float(np.mean(np.log(tr[mask]))))

  measure()
  for i in range(steps):
    tuner.step(batches["a"][i % len(batches["a"])])
    measure()
  return curve


def _plot_curves(out_dir: str, curves: dict, mask: str, lrs: dict):
  plt = pyplot()
  metrics = list(dict.fromkeys(m for c in curves.values() for m in c))
  fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for label, curve in curves.items():
      ax.plot(range(len(curve[metric])), curve[metric], marker="o",
              label=f"{label} (lr {lrs[label]:g})")
    ax.set_xlabel(f"fine-tuning steps on part of the forget set (mask: {mask})")
    ax.set_ylabel("NLL per token on the rest" if metric == "nll"
                  else f"mean {metric.replace('/', ' of ')} facts of the rest")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(f"{out_dir}/relearn.png", dpi=100)
  plt.close(fig)


GCG_CONDITIONS = ("sink-on", "sink-off/exclude", "sink-off/route", "backbone")


def gcg_suite(ctx: Context) -> dict:
  """For `gcg.targets` forget documents, the target is `gcg.target_len` tokens of the text
  after its first max(`gcg.lengths`) tokens (the prefix a "prefix" search starts from); GCG
  searches each prompt length of `gcg.lengths` in turn for a prompt that makes
  the model emit it greedily. ACR = target length / shortest successful length; a passage is
  memorised when ACR > 1. The NULL's conditions are routed as the document's own opening
  would be (under exclude, the forget units are zeroed whatever the route)."""
  g = ctx.settings.gcg
  budget = gcg.Budget.from_config(g)
  conditions = ctx.conditions(GCG_CONDITIONS)
  skip = 1 + max(budget.lengths)   # BOS + the longest prompt's prefix
  docs = [(s, t) for s, t in ctx.documents()[0]
          if len(t) >= skip + g.target_len][:g.targets]
  if not docs:
    raise UserError(f"no forget document has {skip + g.target_len} tokens (BOS, "
                    f"{skip - 1} of prefix, {g.target_len} of target)")
  rows, found = [], {}
  for name, scorer in conditions:
    sources, mode, exclude = doc_condition(scorer, name, docs)
    results = [gcg.shortest_prompt(scorer.server.setup, scorer.server.params,
                                   list(t[skip:skip + g.target_len]), list(t[1:skip]),
                                   int(source), exclude, mode, budget,
                                   scorer.server.tokenizer.bos, seed=i)
               for i, ((_, t), source) in enumerate(zip(docs, sources))]
    acr = [metrics.adversarial_compression_ratio(g.target_len, r["prompt_tokens"])
           if r["prompt_tokens"] else None for r in results]
    hits = [a for a in acr if a is not None]
    found[name] = acr
    rows.append({"condition": name, "targets": len(docs), "found": len(hits) / len(docs),
                 "memorised": sum(a > 1 for a in hits) / len(docs),
                 # over every target, a failed search counting as ACR 0: a mean over found
                 # prompts alone flatters a model where few are found
                 "median_acr": float(np.median([a or 0.0 for a in acr])),
                 "mean_acr_found": float(np.mean(hits)) if hits else None,
                 "mean_target_nll": float(np.mean([r["loss"] for r in results]))})
    print(f"gcg {name}: {len(hits)}/{len(docs)} targets reproduced", flush=True)
  result = {"run": ctx.run, "oracle": ctx.oracle, "budget": dict(g), "acr": found, "rows": rows}
  write_table(ctx.out, "gcg", result, ["condition", "targets", "found", "memorised",
                                       "median_acr", "mean_acr_found", "mean_target_nll"])
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.bar(range(len(rows)), [r["memorised"] for r in rows])
  ax.set_xticks(range(len(rows)), [r["condition"] for r in rows], rotation=30, ha="right")
  ax.set_ylabel(f"targets with ACR > 1 ({g.target_len}-token passages)")
  fig.tight_layout()
  fig.savefig(f"{ctx.out}/gcg.png", dpi=100)
  plt.close(fig)
  return result
