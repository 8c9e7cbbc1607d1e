"""`sinkformer eval --suite capability`: does the NULL pay for its forgetting in general
ability? The NULL (routed with and without the forget set's units zeroed, and its backbone
alone) against two dense controls and any other run, with 95% bootstrap confidence
intervals and paired differences over the same items:

- `dense`: the same total parameters (MLP width G + P, every unit always on);
- `dense_active`: the same *active* parameters per token (MLP width G + k: what a NULL's
  token actually runs through), if given. A NULL that trails the first but not the second
  pays for sparsity, not for forgetting.


- world-fact clozes from word2vec's questions-words (`sinkformer data fetch questions-words`):
  capitals, currencies, US states, nationalities, opposites, family words, each asked as a
  sentence ("The capital of Greece is" -> "Athens") against 4 answers of the same relation;
  accuracy (the answer beats every distractor) and mean log Truth Ratio;
- held-out loss and perplexity on never-seen documents (the run's validation sources).
"""

from __future__ import annotations

import json

import numpy as np

from sinkformer.data import synthetic
from sinkformer.errors import UserError
from sinkformer.eval import metrics
from sinkformer.serve import generate
from sinkformer.eval.context import (Context, candidate_logprobs, doc_condition, pyplot,
                                     write_table)

# section -> (prompt template over the pair (a, b) of an analogy line, which one answers)
TEMPLATES = {
    "capital-common-countries": ("The capital of {b} is", "a"),
    "capital-world": ("The capital of {b} is", "a"),
    "currency": ("The currency of {a} is the", "b"),
    "city-in-state": ("{a} is a city in the state of", "b"),
    "gram6-nationality-adjective": ("A person from {a} is", "b"),
    "gram2-opposite": ("The opposite of {a} is", "b"),
    "family": ("The female form of {a} is", "b"),
}
DISTRACTORS = 4
CONDITIONS = ("sink-off/exclude", "sink-off/route", "backbone")
CONTROLS = ("dense", "dense_active")


def clozes(path: str, count: int, seed: int = 0) -> list[dict]:
  """Up to `count` cloze facts drawn (seeded) from the distinct word pairs of questions-words'
  sections in TEMPLATES (330 exist)."""
  pairs = {}
  try:
    with open(path) as f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          r = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f"{path}:{number}: malformed line: {e.msg}") from None
        words = r.get("text", "").split()
        if r.get("group") in TEMPLATES and len(words) == 4:   # analogy: a b c d
          for a, b in ((words[0], words[1]), (words[2], words[3])):
            pairs[(r["group"], a, b)] = None
  except OSError:
    raise UserError(f"no questions-words at {path}: run 'sinkformer data fetch questions-words' "
                    "(or pass --clozes FILE)") from None
  if not pairs:
    raise UserError(f"{path} has no questions-words sections ({', '.join(TEMPLATES)})")
  answers = {}
  for section, a, b in pairs:
    answers.setdefault(section, set()).add(a if TEMPLATES[section][1] == "a" else b)
  rng = np.random.default_rng(seed)
  pairs = list(pairs)
  items = []
  for i in rng.permutation(len(pairs)):
    section, a, b = pairs[i]
    template, which = TEMPLATES[section]
    answer = a if which == "a" else b
    pool = sorted(answers[section] - {answer})
    if len(pool) < DISTRACTORS:   # a section too small to ask fairly
      continue
    items.append({"relation": section, "prompt": template.format(a=a, b=b), "answer": answer,
                  "distractors": [pool[j] for j in rng.choice(len(pool), DISTRACTORS, False)]})
    if len(items) == count:
      break
  return items


def _runs(ctx: Context) -> list[tuple[str, str, object]]:
  """(label, condition, scorer): the NULL's deployed path and backbone, then `others`."""
  if "dense" not in ctx.others:
    raise UserError("the capability suite compares the NULL with its dense control: train it "
                    "with 'sinkformer train --config CONFIG:dense --workdir DENSE' (the run's "
                    "config with the dense preset) and pass --dense DENSE")
  run = ctx.scorer(ctx.run)
  return ([(f"null {c}", c, run) for c in CONDITIONS]
          + [(name, name, ctx.scorer(path)) for name, path in ctx.others.items()])


def capability_suite(ctx: Context) -> dict:
  c = ctx.settings.capability
  runs = _runs(ctx)
  # the built-in corpus' word tokenizer knows only its own words; ctx.clozes None: offline
  skip = ("the built-in corpus' tokenizer has no such words"
          if isinstance(runs[0][2].server.tokenizer, synthetic.Words)
          else "no questions-words file" if ctx.clozes is None else None)
  items = [] if skip else clozes(ctx.clozes, c.clozes)
  if skip:
    print(f"capability: clozes skipped ({skip}); held-out perplexity only")
  held_out = ctx.documents(ctx.seq_len())[1][:c.documents]
  if not held_out:
    raise UserError(f"{ctx.run} has no held-out documents (data.val_sources = 0 and no "
                    "data.holdout): perplexity needs never-seen text")

  per_item = {}   # label -> metric -> per-item values (same items for every model)
  for label, condition, scorer in runs:
    got = {}
    if items:
      sources, mode, exclude = scorer.condition(condition, [x["prompt"] for x in items],
                                                [None] * len(items))
      lp = candidate_logprobs(scorer, items, sources, mode, exclude)
      got["cloze_accuracy"] = (lp[:, 0] > lp[:, 1:].max(1)).astype(float)
      got["cloze_log_tr"] = np.log(metrics.truth_ratio(lp[:, 0], lp[:, 1:]))
    sources, mode, exclude = doc_condition(scorer, condition, held_out)
    stats = generate.token_stats(scorer.server.setup, scorer.server.params,
                                 [list(t) for _, t in held_out], sources, exclude, mode)
    got["held_out_nll"] = np.asarray([-s["logp"].mean() for s in stats])
    per_item[label] = got

  rows = []
  for label, got in per_item.items():
    for metric, values in got.items():
      lo, hi = metrics.bootstrap_ci(values, n=c.bootstrap)
      row = {"model": label, "metric": metric, "n": len(values), "mean": float(np.mean(values)),
             "ci_low": lo, "ci_high": hi}
      for control in CONTROLS:
        row[f"vs_{control}"] = None
        if control in per_item and label != control:   # paired over the same items
          diff = values - per_item[control][metric]
          d_lo, d_hi = metrics.bootstrap_ci(diff, n=c.bootstrap)
          row[f"vs_{control}"] = f"{np.mean(diff):+.4f} [{d_lo:+.4f}, {d_hi:+.4f}]"
      rows.append(row)
  result = {"run": ctx.run, "others": ctx.others, "rows": rows,
            "perplexity": {r["model"]: float(np.exp(r["mean"])) for r in rows
                           if r["metric"] == "held_out_nll"},
            "documents": {"held_out": len(held_out), "clozes": len(items),
                          "clozes_skipped": skip}}
  write_table(ctx.out, "capability", result, ["model", "metric", "n", "mean", "ci_low",
                                              "ci_high", "vs_dense", "vs_dense_active"])
  _plot(ctx.out, rows)
  return result


def _plot(out_dir: str, rows: list[dict]):
  plt = pyplot()
  names = list(dict.fromkeys(r["metric"] for r in rows))
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
  for ax, metric in zip(axes[0], names):
    chosen = [r for r in rows if r["metric"] == metric]
    means = np.asarray([r["mean"] for r in chosen])
    err = np.abs(np.asarray([[r["ci_low"], r["ci_high"]] for r in chosen]).T - means)
    ax.errorbar(range(len(chosen)), means, yerr=err, fmt="o", capsize=4)
    ax.set_xticks(range(len(chosen)), [r["model"] for r in chosen], rotation=30, ha="right")
    ax.set_title(f"{metric} (95% CI)")
  fig.tight_layout()
  fig.savefig(f"{out_dir}/capability.png", dpi=100)
  plt.close(fig)
