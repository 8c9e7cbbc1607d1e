"""`sinkformer eval`: every condition side by side against the retrain oracle
(every serving mode, every metric). This module holds what the suites share (conditions, scoring, documents, the
one results page) and the facts, membership-inference and extraction suites; attacks.py has
the relearning and GCG attacks, capability.py the capability suite.

Conditions (the forget set F is treated as unlearned; the run's own switchboard is not
changed):
  sink-on            each fact's own source's sinks (the "knows it" reference)
  sink-on/excluded   the same with F's units zeroed: what excluding F costs retained sources
  sink-off/exclude   the nearest surviving source's sinks, F's units zeroed (deployed)
  sink-off/route     the nearest surviving source's sinks, nothing zeroed
  backbone           no sinks
  all-mlp-off        no MLP unit at all, backbone included: what attention and embeddings
                     alone know (the leak outside the MLP)
  placebo            the farthest surviving source's sinks, F's units zeroed (for retained
                     sources: a wrong source's mask, i.e. what "sink-off" costs by identity)
  retrain            the oracle (same config, seed and order, F never seen), sink-off/exclude
  others             named runs, e.g. dense (the control) and ga/graddiff/npo (post-hoc
                     unlearned copies of it, `sinkformer posthoc`)
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import os

import ml_collections
import numpy as np

from sinkformer import config, engine
from sinkformer.data import pipeline
from sinkformer.errors import UserError
from sinkformer.eval import metrics
from sinkformer.model import sinks
from sinkformer.serve import generate, serving


def load_facts(path: str) -> list[dict]:
  try:
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  except OSError as e:
    raise UserError(f"cannot read probes {path}: {e.strerror} (make them with 'sinkformer data "
                    "encyclopedia' or 'sinkformer data probes')") from None


def settings(run_dir: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """The run's `eval` section with `section.field=value` overrides (e.g. gcg.steps=5)."""
  e = engine.load_config(run_dir).eval
  for item in overrides:
    path, eq, value = item.partition("=")
    section, _, field = path.partition(".")
    if not eq or section not in e or field not in e[section]:
      raise UserError(f"--set {item!r}: expected SECTION.FIELD=VALUE with one of "
                      + ", ".join(f"{s}.{f}" for s in e for f in e[s]))
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    current = e[section][field]
    if isinstance(current, (list, tuple)):
      ok = isinstance(parsed, (list, tuple))
    elif isinstance(current, float):
      ok = isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
    else:
      ok = type(parsed) is type(current)
    if not ok:   # e.g. 2.5 for a step count: refuse rather than truncate
      kind = "list" if isinstance(current, (list, tuple)) else type(current).__name__
      raise UserError(f"--set {item!r}: {path} takes a {kind}, e.g. {path}={current!r}")
    e[section][field] = list(parsed) if isinstance(current, (list, tuple)) else type(current)(parsed)
  config.validate_eval(e)
  return e


@dataclasses.dataclass
class Context:
  """What every suite reads: the run, its forget set, what it is compared with, where results
  go, and the eval settings. Loaded runs are kept, so suites run back to back share them."""
  run: str
  forget: list[str]
  oracle: str | None
  others: dict                    # {name: run}, e.g. dense, npo, ga
  out: str
  settings: ml_collections.ConfigDict
  probes: str | None = None       # facts JSONL (facts suite; relearning's Truth Ratio curve)
  clozes: str | None = None       # capability suite: questions-words JSONL
  _scorers: dict = dataclasses.field(default_factory=dict)

  def scorer(self, run_dir: str) -> Scorer:
    if run_dir not in self._scorers:
      self._scorers[run_dir] = Scorer(run_dir, self.forget)
    return self._scorers[run_dir]

  def conditions(self, names=None) -> list[tuple[str, Scorer]]:
    """(condition, scorer) pairs: the run's own conditions (`names`, default all), retrain,
    then `others`, each in its own sink-off path."""
    if not self.forget:
      raise UserError("this suite measures a forget set: pass --forget SOURCES ('a,b' or @FILE)")
    self.require_oracle()
    run = [(n, self.scorer(self.run)) for n in (CONDITIONS if names is None else names)]
    return (run + [("retrain", self.scorer(self.oracle))]
            + [(name, self.scorer(path)) for name, path in self.others.items()])

  def require_oracle(self):
    if self.oracle is None or not os.path.exists(os.path.join(self.oracle, "config.json")):
      raise UserError("this suite compares with the retrain oracle; make it with: "
                      f"sinkformer oracle --run {self.run} --forget "
                      f"{','.join(self.forget[:3])}{'...' if len(self.forget) > 3 else ''} "
                      "--workdir ORACLE_DIR, then pass --oracle ORACLE_DIR")

  def forget_keys(self) -> set:
    return {r["key"] for r in self.scorer(self.run).server.board.resolve(self.forget)}


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
    alive = self.server.alive() & ~np.isin(self.server.router.ids, self.forget)
    queries = serving.Router.embed(self.server.setup, self.server.params,
                                   [self.server.encode(p) for p in prompts])
    return self.server.router.rank(queries, alive, farthest)

  def condition(self, name: str, prompts: list[str], keys: list[str]):
    """(row sources, gate mode, exclusion) of a condition for items asked with `prompts`
    about the sources `keys` (see the module docstring)."""
    n = len(prompts)
    if self.server.setup.spec is None:
      return np.zeros(n, np.int32), "dense", None
    if name in ("sink-on", "sink-on/excluded"):
      return self.ids(keys), "source", self.none if name == "sink-on" else self.exclude
    if name in ("backbone", "all-mlp-off"):
      return np.zeros(n, np.int32), "backbone" if name == "backbone" else "mlp-off", self.exclude
    if name == "placebo":
      return self.routed(prompts, farthest=True), "source", self.exclude
    # sink-off (the retrain oracle and the dense control are measured this way too)
    return self.routed(prompts), "source", self.none if name == "sink-off/route" else self.exclude

  def mean_logprobs(self, prompts, answers, row_sources, mode: str, exclude,
                    params=None) -> np.ndarray:
    tok = self.server.tokenizer
    p = [self.server.encode(x) for x in prompts]
    a = [tok.encode(x) for x in answers]
    total = generate.score(self.server.setup, self.server.params if params is None else params,
                           p, a, row_sources, exclude, mode)
    return total / np.asarray([len(x) for x in a])


CONDITIONS = ("sink-on", "sink-on/excluded", "sink-off/exclude", "sink-off/route", "backbone",
              "all-mlp-off", "placebo")


def candidate_logprobs(scorer: Scorer, facts, sources, mode, exclude, params=None) -> np.ndarray:
  """[N, 1 + J] log P̄ of each fact's answer then its distractors, all (prompt, candidate)
  pairs scored in one batched pass."""
  prompts, answers, rows = [], [], []
  for f, s in zip(facts, sources):
    for candidate in [f["answer"], *f["distractors"]]:
      prompts.append(f["prompt"])
      answers.append(candidate)
      rows.append(s)
  lp = scorer.mean_logprobs(prompts, answers, np.asarray(rows, np.int32), mode, exclude, params)
  return lp.reshape(len(facts), -1)


def truth_ratios(scorer: Scorer, facts, sources, mode, exclude, params=None) -> np.ndarray:
  """TR per fact."""
  per = candidate_logprobs(scorer, facts, sources, mode, exclude, params)
  return metrics.truth_ratio(per[:, 0], per[:, 1:])


def fact_truth_ratios(scorer: Scorer, name: str, facts, params=None) -> np.ndarray:
  """TR per fact under condition `name`."""
  return truth_ratios(scorer, facts, *scorer.condition(
      name, [f["prompt"] for f in facts], [f["source"] for f in facts]), params)


def categories(facts) -> list[str]:
  return list(dict.fromkeys(f["category"] for f in facts))


def facts_suite(ctx: Context, retained: int = 100) -> dict:
  """Truth Ratios of the forget set's facts and of up to `retained` facts per category about
  other sources (what unlearning costs them), every condition vs the retrain oracle."""
  if not ctx.probes:
    raise UserError("--suite facts needs --facts FILE (from 'sinkformer data encyclopedia' or "
                    "'sinkformer data probes')")
  facts = load_facts(ctx.probes)
  forget_keys = ctx.forget_keys()
  items = [f for f in facts if f["source"] in forget_keys]
  kept, per_category = [], collections.Counter()
  for f in facts:
    if f["source"] not in forget_keys and per_category[f["category"]] < retained:
      per_category[f["category"]] += 1
      kept.append(f)
  if not items:
    raise UserError(f"no probe in {ctx.probes} is about the forget set")
  sets = {"forget": items, "retained": kept}
  tr = {name: {split: fact_truth_ratios(scorer, name, fs) for split, fs in sets.items()}
        for name, scorer in ctx.conditions()}

  table = []
  for split, fs in sets.items():
    for category in categories(facts):
      mask = np.asarray([f["category"] == category for f in fs])
      if not mask.any():
        continue
      for name, by_split in tr.items():
        values = by_split[split][mask]
        lo, hi = metrics.bootstrap_ci(np.log(values))
        aggregate = metrics.tofu_forget if split == "forget" else metrics.tofu_retain
        row = {"set": split, "category": category, "condition": name, "n": int(mask.sum()),
               "mean_log_tr": float(np.mean(np.log(values))), "log_tr_ci_lo": lo,
               "log_tr_ci_hi": hi, "mean_tr": float(np.mean(values)),
               "tofu_tr": aggregate(values)}
        if name != "retrain":
          row["forget_quality"] = metrics.forget_quality(values, tr["retrain"][split][mask])
        table.append(row)
  result = {"run": ctx.run, "oracle": ctx.oracle, "others": ctx.others, "probes": ctx.probes,
            "forget": sorted(forget_keys),
            "policy_note": "sink-off/exclude zeroes F's units; sink-off/route does not",
            "tr_note": ("mean_log_tr: the mean of log TR over items, with a 95% bootstrap CI; "
                        "mean_tr: the mean of TR (how the paper's TR of about 1.9 reads); "
                        "tofu_tr: TOFU's aggregate, mean(min(R, 1/R)) on the forget set and "
                        "mean(max(0, 1 - R)) on retained facts, R = 1/TR; forget_quality: "
                        "the two-sided KS p-value against the retrain over the row's n items"),
            "rows": table,
            "truth_ratios": {c: {s: v.tolist() for s, v in d.items()} for c, d in tr.items()},
            "categories": {split: [f["category"] for f in fs] for split, fs in sets.items()}}
  for r in table:
    r.setdefault("forget_quality", None)   # retrain against itself
  write_table(ctx.out, "facts", result, ["set", "category", "condition", "n", "mean_log_tr",
                                         "log_tr_ci_lo", "log_tr_ci_hi", "mean_tr", "tofu_tr",
                                         "forget_quality"])
  _plot_truth_ratios(ctx.out, tr, sets, categories(facts))
  write_page(ctx.out)
  return result


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


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


PREFIX = 32   # tokens of a document given as the prompt (extraction) or routing query


def documents(run_dir: str, forget_ids: np.ndarray, cap: int = 256):
  """(forget documents, never-seen documents) of a run as [(source id, tokens)], the latter
  from its held-out validation sources."""
  cfg, _ = engine.trained_config(run_dir)
  d = pipeline.load(cfg, log=lambda _: None)
  seen, unseen = d.seen.docs, d.unseen.docs
  never = np.setdiff1d(forget_ids, d.trained_sources())
  if never.size:   # a held-out or excluded source: nothing to forget, and MIA's never-seen set
    raise UserError(f"source(s) {never.tolist()[:10]} of the forget set were never trained on "
                    "(held out or excluded): forget sources the run trained on")
  pick = lambda docs, index: [(int(docs.source_ids[i]), t[:cap])
                              for i, t in zip(index, docs.read(index))]
  return (pick(seen, np.flatnonzero(np.isin(seen.source_ids, forget_ids))),
          pick(unseen, np.flatnonzero(d.unseen.keep)))


def retained_documents(run_dir: str, forget_ids, count: int, cap: int):
  """The first `count` training documents of sources outside the forget set."""
  cfg, _ = engine.trained_config(run_dir)
  seen = pipeline.load(cfg, log=lambda _: None).seen
  index = np.flatnonzero(seen.keep & ~np.isin(seen.docs.source_ids, forget_ids))[:count]
  return [(int(seen.docs.source_ids[i]), t[:cap]) for i, t in zip(index, seen.docs.read(index))]


def doc_condition(scorer: Scorer, name: str, docs):
  """A condition for documents: routed by their first PREFIX tokens."""
  tok, cat = scorer.server.tokenizer, scorer.server.board.catalog
  prefixes = [tok.decode(t[:PREFIX + 1]) for _, t in docs]
  return scorer.condition(name, prefixes, [cat.get(s)["key"] for s, _ in docs])


def mia_suite(ctx: Context) -> dict:
  """Membership-inference AUCs (forget vs never-seen documents) for the loss, zlib, Min-K%
  and Min-K%++ scores under every condition, PrivLeak against the retrain oracle, and the
  mean loss on forgotten vs never-seen documents (memory left behind).

  `auc` is the membership AUC (1: the forget set looks trained on, 0.5: it does not);
  `muse_auc` = 1 - auc is MUSE's orientation, and `privleak` is MUSE's PrivLeak on it, so
  the min_k row (k = 40%) sits next to MUSE's and OpenUnlearning's tables."""
  rows, aucs, means = [], {}, {}
  conditions = ctx.conditions()
  forget_docs, holdout_docs = documents(ctx.run, conditions[0][1].forget)
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
  write_page(ctx.out)
  return result


def extraction_suite(ctx: Context, length: int = PREFIX) -> dict:
  """Verbatim extraction: the first PREFIX tokens of each forget document as the prompt, a
  greedy continuation of `length` tokens, extracted when ROUGE-L recall or edit similarity
  with the true continuation is >= 0.9; the rate per condition. With the continuation
  teacher-forced: exact memorisation (tokens the argmax gets right) and extraction strength
  (the longest right suffix), as TOFU/OpenUnlearning define them."""
  rows = []
  conditions = ctx.conditions()
  docs = [(s, t) for s, t in documents(ctx.run, conditions[0][1].forget)[0]
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
  write_page(ctx.out)
  return result


def write_table(out_dir: str, name: str, result: dict, columns: list[str]):
  """NAME.json (everything) and NAME.md (the table), and print the table."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=1)
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in result["rows"]]
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


# The results page: every suite that has run, in this order, with its plots.
PAGE = (("facts", "Truth Ratio of probe facts", ["facts_truth_ratio.png"]),
        ("mia", "Membership inference (forget vs never-seen documents)", []),
        ("extraction", "Verbatim extraction (32-token prefix, greedy)", []),
        ("relearn", "Relearning attack", ["relearn.png"]),
        ("gcg", "GCG extraction: adversarial compression ratio", ["gcg.png"]),
        ("capability", "Capability: NULL vs dense control", ["capability.png"]))


def write_page(out_dir: str):
  """OUT/index.md: all the tables and plots of the suites run so far, on one page."""
  parts = ["# sinkformer eval", ""]
  for name, title, plots in PAGE:
    table = os.path.join(out_dir, f"{name}.md")
    if not os.path.exists(table):
      continue
    with open(os.path.join(out_dir, f"{name}.json")) as f:
      notes = {k: v for k, v in json.load(f).items() if k in ("run", "oracle", "attack_mask",
                                                              "budget", "documents", "probes")}
    with open(table) as f:
      parts += [f"## {title}", "", "`" + json.dumps(notes) + "`", "", f.read()]
    parts += [f"![{name}]({p})\n" for p in plots if os.path.exists(os.path.join(out_dir, p))]
  with open(os.path.join(out_dir, "index.md"), "w") as f:
    f.write("\n".join(parts))
