"""What every evaluation suite shares: the conditions a model is measured under, scoring,
the documents measured, and result tables. The suites (facts.py, membership.py, attacks.py,
capability.py) are listed in suites.py, which runs them and writes the one results page.

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

import dataclasses
import json
import os

import ml_collections
import numpy as np

from sinkformer import config

from sinkformer.data import pipeline
from sinkformer.errors import UserError
from sinkformer.eval import metrics
from sinkformer.model import sinks
from sinkformer.run import directory
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
  e = config.override(directory.load_config(run_dir).eval, overrides, "--set")
  config.validate_eval(e)
  return e


@dataclasses.dataclass
class Context:
  """What every suite reads: the run, its forget set, what it is compared with, where results
  go, and the eval settings. Loaded runs and documents are kept, so suites run back to back
  share them."""
  run: str
  forget: list[str]
  oracle: str | None
  others: dict                    # {name: run}, e.g. dense, npo, ga
  out: str
  settings: ml_collections.ConfigDict
  probes: str | None = None       # facts JSONL (facts suite; relearning's Truth Ratio curve)
  clozes: str | None = None       # capability suite: questions-words JSONL
  oracle2: str | None = None      # a second retrain (another seed): the noise floor
  _scorers: dict = dataclasses.field(default_factory=dict)
  _documents: dict = dataclasses.field(default_factory=dict)

  def scorer(self, run_dir: str) -> Scorer:
    if run_dir not in self._scorers:
      self._scorers[run_dir] = Scorer(run_dir, self.forget)
    return self._scorers[run_dir]

  def conditions(self, names=None) -> list[tuple[str, Scorer]]:
    """(condition, scorer) pairs: the run's own conditions (`names`, default all), retrain
    (and retrain-2, a second seed, if given), then `others`, each in its own sink-off path."""
    if not self.forget:
      raise UserError("this suite measures a forget set: pass --forget SOURCES ('a,b' or @FILE)")
    self.require_oracle()
    run = [(n, self.scorer(self.run)) for n in (CONDITIONS if names is None else names)]
    second = [("retrain-2", self.scorer(self.oracle2))] if self.oracle2 else []
    return (run + [("retrain", self.scorer(self.oracle))] + second
            + [(name, self.scorer(path)) for name, path in self.others.items()])

  def require_oracle(self):
    if self.oracle is None or not os.path.exists(os.path.join(self.oracle, "config.json")):
      raise UserError("this suite compares with the retrain oracle; make it with: "
                      f"sinkformer oracle --run {self.run} --forget "
                      f"{','.join(self.forget[:3])}{'...' if len(self.forget) > 3 else ''} "
                      "--workdir ORACLE_DIR, then pass --oracle ORACLE_DIR")

  def documents(self, cap: int = 256):
    """(forget documents, never-seen documents) of the run, loaded once per cap."""
    if cap not in self._documents:
      self._documents[cap] = documents(load_data(self.run), self.scorer(self.run).forget, cap)
    return self._documents[cap]

  def seq_len(self) -> int:
    return directory.load_config(self.run).data.seq_len

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


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


PREFIX = 32   # tokens of a document given as the prompt (extraction) or routing query


def load_data(run_dir: str) -> pipeline.Data:
  """The data a run trained on (its recorded corpus and selection)."""
  cfg, _ = directory.trained_config(run_dir)
  return pipeline.load(cfg, log=lambda _: None)


def documents(data: pipeline.Data, forget_ids: np.ndarray, cap: int = 256):
  """(forget documents, never-seen documents) of a run's data as [(source id, tokens)], the
  latter from its held-out validation sources."""
  seen, unseen = data.seen.docs, data.unseen.docs
  never = np.setdiff1d(forget_ids, data.trained_sources())
  if never.size:   # a held-out or excluded source: nothing to forget, and MIA's never-seen set
    raise UserError(f"source(s) {never.tolist()[:10]} of the forget set were never trained on "
                    "(held out or excluded): forget sources the run trained on")
  pick = lambda docs, index: [(int(docs.source_ids[i]), t[:cap])
                              for i, t in zip(index, docs.read(index))]
  return (pick(seen, np.flatnonzero(np.isin(seen.source_ids, forget_ids))),
          pick(unseen, np.flatnonzero(data.unseen.keep)))


def retained_documents(data: pipeline.Data, forget_ids, count: int, cap: int):
  """The first `count` training documents of sources outside the forget set."""
  seen = data.seen
  index = np.flatnonzero(seen.keep & ~np.isin(seen.docs.source_ids, forget_ids))[:count]
  return [(int(seen.docs.source_ids[i]), t[:cap]) for i, t in zip(index, seen.docs.read(index))]


def doc_condition(scorer: Scorer, name: str, docs):
  """A condition for documents: routed by their first PREFIX tokens."""
  tok, cat = scorer.server.tokenizer, scorer.server.board.catalog
  prefixes = [tok.decode(t[:PREFIX + 1]) for _, t in docs]
  return scorer.condition(name, prefixes, [cat.get(s)["key"] for s, _ in docs])


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
