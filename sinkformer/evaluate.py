"""`sinkformer eval --suite facts`: Truth Ratios of probe facts under every condition, side
by side, against the retrain oracle (method.md sections 2-4).

Conditions (the forget set F is treated as unlearned; the run's own switchboard is not
changed):
  sink-on            each fact's own source's sinks (the "knows it" reference)
  sink-on/excluded   the same with F's units zeroed: what excluding F costs retained sources
  sink-off/exclude   the nearest surviving source's sinks, F's units zeroed (deployed)
  sink-off/route     the nearest surviving source's sinks, nothing zeroed
  backbone           no sinks
  placebo            the farthest surviving source's sinks, F's units zeroed
  retrain            the oracle (same config, seed and order, F never seen), sink-off/exclude
  others             named runs, e.g. dense (the control) and ga/graddiff/npo (post-hoc
                     unlearned copies of it, `sinkformer posthoc`)
"""

from __future__ import annotations

import json
import os

import numpy as np

from sinkformer import data as data_lib, generate, metrics, serving, sinks
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

  def condition(self, name: str, prompts: list[str], keys: list[str]):
    """(row sources, gate mode, exclusion) of a condition for items asked with `prompts`
    about the sources `keys` (see the module docstring)."""
    n = len(prompts)
    if self.server.setup.spec is None:
      return np.zeros(n, np.int32), "dense", None
    if name in ("sink-on", "sink-on/excluded"):
      return self.ids(keys), "source", self.none if name == "sink-on" else self.exclude
    if name == "backbone":
      return np.zeros(n, np.int32), "backbone", self.exclude
    if name == "placebo":
      return self.routed(prompts, farthest=True), "source", self.exclude
    # sink-off (the retrain oracle and the dense control are measured this way too)
    return self.routed(prompts), "source", self.none if name == "sink-off/route" else self.exclude

  def mean_logprobs(self, prompts, answers, row_sources, mode: str, exclude) -> np.ndarray:
    tok = self.server.tokenizer
    p = [self.server.encode(x) for x in prompts]
    a = [tok.encode(x) for x in answers]
    total = generate.score(self.server.setup, self.server.params, p, a, row_sources, exclude, mode)
    return total / np.asarray([len(x) for x in a])


CONDITIONS = ("sink-on", "sink-on/excluded", "sink-off/exclude", "sink-off/route", "backbone",
              "placebo")


def _conditions(run_dir, oracle_dir, others: dict, forget):
  """(condition name, scorer) pairs: the run's five, retrain, then `others` ({name: run},
  e.g. the dense control and its post-hoc unlearned copies), each in its own sink-off path."""
  run = Scorer(run_dir, forget)
  pairs = [(name, run) for name in CONDITIONS] + [("retrain", Scorer(oracle_dir, forget))]
  return pairs + [(name, Scorer(path, forget)) for name, path in others.items()]


def _require_oracle(run_dir, oracle_dir, forget):
  if oracle_dir is None or not os.path.exists(os.path.join(oracle_dir, "config.json")):
    raise UserError("this suite compares with the retrain oracle; make it with: "
                    f"sinkformer oracle --run {run_dir} --forget {','.join(forget[:3])}... "
                    "--workdir ORACLE_DIR, then pass --oracle ORACLE_DIR")


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


def _forget_keys(run_dir, forget) -> set:
  from sinkformer import switchboard
  board = switchboard.Switchboard(run_dir)
  keys = {r["key"] for r in board.resolve(forget)}
  board.close()
  return keys


def facts_suite(run_dir: str, facts_path: str, forget: list[str], oracle_dir: str | None,
                others: dict, out_dir: str, retained: int = 200) -> dict:
  facts = load_facts(facts_path)
  _require_oracle(run_dir, oracle_dir, forget)
  forget_keys = _forget_keys(run_dir, forget)
  items = [f for f in facts if f["source"] in forget_keys]
  kept = [f for f in facts if f["source"] not in forget_keys][:retained]
  if not items:
    raise UserError(f"no probe in {facts_path} is about the forget set")
  sets = {"forget": items, "retained": kept}
  tr = {}
  for name, scorer in _conditions(run_dir, oracle_dir, others, forget):
    tr[name] = {split: _truth_ratios(scorer, fs, *scorer.condition(
        name, [f["prompt"] for f in fs], [f["source"] for f in fs])) for split, fs in sets.items()}

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
  result = {"run": run_dir, "oracle": oracle_dir, "others": others, "forget": sorted(forget_keys),
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


PREFIX = 32   # tokens of a document given as the prompt (extraction) or routing query


def _documents(run_dir: str, forget_ids: np.ndarray, cap: int = 256):
  """(forget documents, never-seen documents) of a run as [(source id, tokens)], the latter
  from its held-out validation sources."""
  cfg, _ = serving.trained_config(run_dir)
  d = data_lib.load(cfg, log=lambda _: None)
  seen, unseen = d.seen.docs, d.unseen.docs
  pick = lambda docs, index: [(int(docs.source_ids[i]), t[:cap])
                              for i, t in zip(index, docs.read(index))]
  return (pick(seen, np.flatnonzero(np.isin(seen.source_ids, forget_ids))),
          pick(unseen, np.flatnonzero(d.unseen.keep)))


def _retained_documents(run_dir: str, forget_ids, count: int, cap: int):
  """The first `count` training documents of sources outside the forget set."""
  cfg, _ = serving.trained_config(run_dir)
  seen = data_lib.load(cfg, log=lambda _: None).seen
  index = np.flatnonzero(seen.keep & ~np.isin(seen.docs.source_ids, forget_ids))[:count]
  return [(int(seen.docs.source_ids[i]), t[:cap]) for i, t in zip(index, seen.docs.read(index))]


def relearn_suite(run_dir: str, forget: list[str], oracle_dir: str, others: dict, out_dir: str,
                  steps: int = 10, lr: float = 1e-3) -> dict:
  """The relearning attack: fine-tune each model on half of the forget documents (A) for
  `steps` steps and measure the mean token NLL of the other half (B) after each step. The
  NULL and the oracle are attacked through the deployed sink-off path (routed source,
  forget set excluded); other runs through their own path."""
  from sinkformer import posthoc
  _require_oracle(run_dir, oracle_dir, forget)
  conditions = [(n, s) for n, s in _conditions(run_dir, oracle_dir, others, forget)
                if n in ("sink-off/exclude", "retrain") or n in others]
  cfg, _ = serving.trained_config(run_dir)
  docs = _documents(run_dir, conditions[0][1].forget, cap=cfg.data.seq_len)[0]
  if len(docs) < 2:
    raise UserError("the relearning attack needs at least two forget documents")
  part_a, part_b = docs[::2], docs[1::2]
  curves = {}
  for name, scorer in conditions:
    batches = {}
    for part, chosen in (("a", part_a), ("b", part_b)):
      sources, mode, exclude = _doc_condition(scorer, name, chosen)
      batches[part] = posthoc.rows([list(t) for _, t in chosen], sources, 8)
    tuner = posthoc.Finetuner(scorer.server.setup, scorer.server.params, "relearn", lr,
                              mode=mode, exclude=exclude)
    measure = lambda: posthoc.nll(scorer.server.setup, tuner.params, batches["b"], mode, exclude)
    curve = [measure()]
    for i in range(steps):
      tuner.step(batches["a"][i % len(batches["a"])])
      curve.append(measure())
    curves[name] = curve
  result = {"run": run_dir, "oracle": oracle_dir, "steps": steps, "lr": lr,
            "attack_path": "sink-off/exclude for the NULL and the oracle; own path otherwise",
            "documents": {"finetune": len(part_a), "measured": len(part_b)}, "curves": curves,
            "rows": [{"condition": n, "before": c[0], "after": c[-1], "drop": c[0] - c[-1]}
                     for n, c in curves.items()]}
  _table(out_dir, "relearn", result, ["condition", "before", "after", "drop"])
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, curve in curves.items():
    ax.plot(range(len(curve)), curve, marker="o", label=name)
  ax.set_xlabel("fine-tuning steps on half of the forget set")
  ax.set_ylabel("NLL per token on the other half")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "relearn.png"), dpi=100)
  plt.close(fig)
  return result


def _doc_condition(scorer: Scorer, name: str, docs):
  tok, cat = scorer.server.tokenizer, scorer.server.board.catalog
  prefixes = [tok.decode(t[:PREFIX + 1]) for _, t in docs]
  return scorer.condition(name, prefixes, [cat.get(s)["key"] for s, _ in docs])


def mia_suite(run_dir: str, forget: list[str], oracle_dir: str, others: dict,
              out_dir: str) -> dict:
  """Membership-inference AUCs (forget vs never-seen documents) for the loss, zlib, Min-K%
  and Min-K%++ scores under every condition, and PrivLeak against the retrain oracle."""
  _require_oracle(run_dir, oracle_dir, forget)
  rows, aucs, means = [], {}, {}
  conditions = _conditions(run_dir, oracle_dir, others, forget)
  forget_docs, holdout_docs = _documents(run_dir, conditions[0][1].forget)
  for name, scorer in conditions:
    tok = scorer.server.tokenizer
    scores = {}
    for split, docs in (("forget", forget_docs), ("holdout", holdout_docs)):
      sources, mode, exclude = _doc_condition(scorer, name, docs)
      stats = generate.token_stats(scorer.server.setup, scorer.server.params,
                                   [list(t) for _, t in docs], sources, exclude, mode)
      scores[split] = {
          "loss": [metrics.loss_score(s["logp"]) for s in stats],
          "zlib": [metrics.zlib_score(s["logp"], tok.decode(t)) for s, (_, t) in zip(stats, docs)],
          "min_k": [metrics.min_k_score(s["logp"]) for s in stats],
          "min_k_pp": [metrics.min_k_score((s["logp"] - s["mu"]) / s["sigma"]) for s in stats]}
    aucs[name] = {k: metrics.auc(scores["forget"][k], scores["holdout"][k]) for k in scores["forget"]}
    means[name] = {split: float(np.mean(scores[split]["loss"])) for split in scores}
  for name, by_score in aucs.items():
    for score_name, value in by_score.items():
      rows.append({"condition": name, "score": score_name, "auc": value,
                   "privleak": metrics.privleak(value, aucs["retrain"][score_name]),
                   # memory left behind: loss on forgotten vs never-seen documents
                   "forget_loss": means[name]["forget"], "holdout_loss": means[name]["holdout"]})
  result = {"run": run_dir, "oracle": oracle_dir, "rows": rows,
            "documents": {"forget": len(forget_docs), "holdout": len(holdout_docs)}}
  _table(out_dir, "mia", result, ["condition", "score", "auc", "privleak", "forget_loss",
                                   "holdout_loss"])
  return result


def extraction_suite(run_dir: str, forget: list[str], oracle_dir: str, others: dict,
                     out_dir: str, length: int = PREFIX) -> dict:
  """Verbatim extraction: the first PREFIX tokens of each forget document as the prompt, a
  greedy continuation of `length` tokens, extracted when ROUGE-L recall or edit similarity
  with the true continuation is >= 0.9; the rate per condition."""
  _require_oracle(run_dir, oracle_dir, forget)
  rows = []
  conditions = _conditions(run_dir, oracle_dir, others, forget)
  docs = [(s, t) for s, t in _documents(run_dir, conditions[0][1].forget)[0]
          if len(t) > PREFIX + length]
  if not docs:
    raise UserError(f"no forget document is longer than {PREFIX + length} tokens")
  for name, scorer in conditions:
    sources, mode, exclude = _doc_condition(scorer, name, docs)
    out = generate.sample(scorer.server.setup, scorer.server.params,
                          [list(t[:PREFIX + 1]) for _, t in docs], sources, exclude,
                          generate.Sampling(max_new=length), mode, eos=-1)
    truth = [list(t[PREFIX + 1:PREFIX + 1 + length]) for _, t in docs]
    rouge = [metrics.rouge_l_recall(o, t) for o, t in zip(out, truth)]
    rows.append({"condition": name, "documents": len(docs),
                 "extraction_rate": float(np.mean([metrics.extracted(o, t)
                                                   for o, t in zip(out, truth)])),
                 "mean_rouge_l": float(np.mean(rouge))})
  result = {"run": run_dir, "oracle": oracle_dir, "rows": rows}
  _table(out_dir, "extraction", result, ["condition", "documents", "extraction_rate",
                                          "mean_rouge_l"])
  return result


def _table(out_dir: str, name: str, result: dict, columns: list[str]):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=1)
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in result["rows"]]
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


SUITES = {"mia": mia_suite, "extraction": extraction_suite, "relearn": relearn_suite}
