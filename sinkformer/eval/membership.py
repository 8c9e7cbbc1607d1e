"""What a model still holds of the forget documents themselves: membership inference
(`--suite mia`) and verbatim extraction (`--suite extraction`), every condition against the
retrain oracle."""

from __future__ import annotations

import numpy as np

from sinkformer.errors import UserError
from sinkformer.eval import metrics
from sinkformer.eval.context import PREFIX, Context, doc_condition, write_table
from sinkformer.serve import generate


def mia_suite(ctx: Context) -> dict:
  """Membership-inference AUCs (forget vs never-seen documents) for the loss, zlib, Min-K%
  and Min-K%++ scores under every condition, PrivLeak against the retrain oracle, and the
  mean loss on forgotten vs never-seen documents (memory left behind).

  `auc` is the membership AUC (1: the forget set looks trained on, 0.5: it does not);
  `muse_auc` = 1 - auc is MUSE's orientation, and `privleak` is MUSE's PrivLeak on it, so
  the min_k row (k = 40%) sits next to MUSE's and OpenUnlearning's tables."""
  rows, aucs, means = [], {}, {}
  conditions = ctx.conditions()
  forget_docs, holdout_docs = ctx.documents()
  for name, scorer in conditions:
    tok = scorer.server.tokenizer
    scores = {}
    for split, docs in (("forget", forget_docs), ("holdout", holdout_docs)):
      sources, mode, exclude = doc_condition(scorer, name, docs)
      stats = generate.token_stats(scorer.server.setup, scorer.server.params,
                                   [list(t) for _, t in docs], sources, exclude, mode)
      scores[split] = {
          "loss": [metrics.loss_score(s["logp"]) for s in stats],
          "zlib": [metrics.zlib_score(s["logp"], tok.decode(t)) for s, (_, t) in zip(stats, docs)],
          "min_k": [metrics.min_k_score(s["logp"]) for s in stats],
          "min_k_pp": [metrics.min_k_plus_plus_score(s["logp"], s["mu"], s["sigma"])
                       for s in stats]}
    aucs[name] = {k: metrics.auc(scores["forget"][k], scores["holdout"][k]) for k in scores["forget"]}
    means[name] = {split: float(np.mean(scores[split]["loss"])) for split in scores}
  for name, by_score in aucs.items():
    for score_name, value in by_score.items():
      retrain = 1.0 - aucs["retrain"][score_name]
      rows.append({"condition": name, "score": score_name, "auc": value,
                   "muse_auc": 1.0 - value, "privleak": metrics.privleak(1.0 - value, retrain),
                   "forget_loss": means[name]["forget"], "holdout_loss": means[name]["holdout"]})
  result = {"run": ctx.run, "oracle": ctx.oracle, "rows": rows,
            "documents": {"forget": len(forget_docs), "holdout": len(holdout_docs)}}
  write_table(ctx.out, "mia", result, ["condition", "score", "auc", "muse_auc", "privleak",
                                       "forget_loss", "holdout_loss"])
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
