"""What a model still holds of the forget documents themselves: membership inference
(`--suite mia`) and verbatim extraction (`--suite extraction`), every condition against the
retrain oracle."""

from __future__ import annotations

import numpy as np

from sinkformer.errors import UserError
from sinkformer.eval import metrics
from sinkformer.eval.context import PREFIX, Context, doc_condition, write_table
from sinkformer.serve import generate


BOOTSTRAP = 1000   # resamples behind every interval of the suite


def mia_suite(ctx: Context) -> dict:
  """Membership-inference AUCs (forget vs never-seen documents) for the loss, zlib, Min-K%
  and Min-K%++ scores under every condition, PrivLeak against the retrain oracle, and the
  mean loss on forgotten vs never-seen documents (memory left behind). Documents are cut to
  the training window (data.seq_len): what the model saw of them, no more.

  `auc` is the membership AUC (1: the forget set looks trained on, 0.5: it does not), with
  a 95% bootstrap CI (documents resampled by source); `muse_auc` = 1 - auc is MUSE's
  orientation and `privleak` MUSE's PrivLeak on it (the min_k row, k = 40%, sits next to
  MUSE's tables), with a paired CI; `gap` = auc - the retrain's, with a paired CI (the same
  documents resampled for both models). `retrain_like`: the gap's CI reaches within the
  noise floor, how far a second retrain (another seed, `retrain-2`) lands from the first
  (0 without one)."""
  rows, scores, means = [], {}, {}
  forget_docs, holdout_docs = ctx.documents(ctx.seq_len())
  groups = {"forget": [s for s, _ in forget_docs], "holdout": [s for s, _ in holdout_docs]}
  for name, scorer in ctx.conditions():
    tok = scorer.server.tokenizer
    by_split = {}
    for split, docs in (("forget", forget_docs), ("holdout", holdout_docs)):
      sources, mode, exclude = doc_condition(scorer, name, docs)
      stats = generate.token_stats(scorer.server.setup, scorer.server.params,
                                   [list(t) for _, t in docs], sources, exclude, mode)
      by_split[split] = {
          "loss": [metrics.loss_score(s["logp"]) for s in stats],
          "zlib": [metrics.zlib_score(s["logp"], tok.decode(t)) for s, (_, t) in zip(stats, docs)],
          "min_k": [metrics.min_k_score(s["logp"]) for s in stats],
          "min_k_pp": [metrics.min_k_plus_plus_score(s["logp"], s["mu"], s["sigma"])
                       for s in stats]}
    scores[name] = by_split
    means[name] = {split: float(np.mean(by_split[split]["loss"])) for split in by_split}
  retrain = scores["retrain"]
  for name, by_split in scores.items():
    for score in by_split["forget"]:
      f, h = by_split["forget"][score], by_split["holdout"][score]
      rf, rh = retrain["forget"][score], retrain["holdout"][score]
      auc = metrics.auc(f, h)
      lo, hi = metrics.auc_ci(f, h, groups["forget"], groups["holdout"], BOOTSTRAP)
      row = {"condition": name, "score": score, "auc": auc, "auc_lo": lo, "auc_hi": hi,
             "muse_auc": 1.0 - auc, "privleak": metrics.privleak(1.0 - auc,
                                                                   1.0 - metrics.auc(rf, rh)),
             "gap": auc - metrics.auc(rf, rh), "forget_loss": means[name]["forget"],
             "holdout_loss": means[name]["holdout"]}
      if name != "retrain":
        pair = (f, h, rf, rh, groups["forget"], groups["holdout"], BOOTSTRAP)
        row["privleak_lo"], row["privleak_hi"] = metrics.privleak_ci(*pair)
        row["gap_lo"], row["gap_hi"] = metrics.paired_auc_gap_ci(*pair)
      rows.append(row)
  floor = {r["score"]: abs(r["gap"]) for r in rows if r["condition"] == "retrain-2"}
  for r in rows:
    r.setdefault("privleak_lo", None), r.setdefault("privleak_hi", None)
    r.setdefault("gap_lo", None), r.setdefault("gap_hi", None)
    r["retrain_like"] = (None if r["condition"] in ("retrain", "retrain-2") else
                         metrics.retrain_like((r["gap_lo"], r["gap_hi"]),
                                              floor.get(r["score"], 0.0)))
  result = {"run": ctx.run, "oracle": ctx.oracle, "oracle2": ctx.oracle2, "rows": rows,
            "noise_floor": floor,
            "documents": {"forget": len(forget_docs), "holdout": len(holdout_docs),
                          "tokens_at_most": ctx.seq_len()}}
  write_table(ctx.out, "mia", result, ["condition", "score", "auc", "auc_lo", "auc_hi", "gap",
                                       "gap_lo", "gap_hi", "retrain_like", "privleak",
                                       "privleak_lo", "privleak_hi", "forget_loss",
                                       "holdout_loss"])
  return result


def extraction_suite(ctx: Context, length: int = PREFIX) -> dict:
  """Verbatim extraction: the first PREFIX tokens of each forget document as the prompt, a
  greedy continuation of `length` tokens, extracted when ROUGE-L recall or edit similarity
  with the true continuation is >= 0.9; the rate per condition. With the continuation
  teacher-forced: exact memorisation (tokens the argmax gets right) and extraction strength
  (the longest right suffix), as TOFU/OpenUnlearning define them."""
  rows = []
  conditions = ctx.conditions()
  docs = [(s, t) for s, t in ctx.documents()[0]
          if len(t) > PREFIX + length]
  if not docs:
    raise UserError(f"no forget document is longer than {PREFIX + length} tokens")
  for name, scorer in conditions:
    sources, mode, exclude = doc_condition(scorer, name, docs)
    out = generate.sample(scorer.server.setup, scorer.server.params,
                          [list(t[:PREFIX + 1]) for _, t in docs], sources, exclude,
                          generate.Sampling(max_new=length), mode, eos=-1)
    truth = [list(t[PREFIX + 1:PREFIX + 1 + length]) for _, t in docs]
    rouge = [metrics.rouge_l_recall(o, t) for o, t in zip(out, truth)]
    forced = [s["argmax"][PREFIX:] for s in generate.token_stats(   # teacher-forced
        scorer.server.setup, scorer.server.params,
        [list(t[:PREFIX + 1 + length]) for _, t in docs], sources, exclude, mode)]
    rows.append({"condition": name, "documents": len(docs),
                 "extraction_rate": float(np.mean([metrics.extracted(o, t)
                                                   for o, t in zip(out, truth)])),
                 "mean_rouge_l": float(np.mean(rouge)),
                 "exact_memorization": float(np.mean([metrics.exact_memorization(a, t)
                                                      for a, t in zip(forced, truth)])),
                 "extraction_strength": float(np.mean([metrics.extraction_strength(a, t)
                                                       for a, t in zip(forced, truth)])),
                 # the greedy continuation's first token is the teacher-forced argmax there:
                 # 1.0 unless the two are misaligned
                 "first_token_agrees": float(np.mean([len(o) > 0 and o[0] == a[0]
                                                      for o, a in zip(out, forced)]))})
  result = {"run": ctx.run, "oracle": ctx.oracle, "rows": rows}
  write_table(ctx.out, "extraction", result, ["condition", "documents", "extraction_rate",
                                              "mean_rouge_l", "exact_memorization",
                                              "extraction_strength"])
  return result
