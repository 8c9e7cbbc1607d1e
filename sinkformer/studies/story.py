"""`sinkformer story`: the whole experiment on one machine, start to finish.

Generate the fictional encyclopedia -> train the NULL on it -> train its retrain oracle
without the forget set -> train the dense control -> unlearn the forget set from the dense
control with NPO and gradient ascent -> unlearn it from the NULL (the switchboard) ->
generate before/after -> measure facts, membership inference, verbatim extraction,
relearning, GCG extraction (a small budget: STORY_GCG) and capability for every condition
side by side, all on one page (WORKDIR/eval/index.md). Every step writes into WORKDIR; a
step whose output exists is not redone, so an interrupted story resumes.
"""

from __future__ import annotations

import os

from sinkformer.data import encyclopedia, fetch
from sinkformer.errors import UserError
from sinkformer.eval import context, posthoc, suites
from sinkformer.run import switchboard
from sinkformer.serve import serving
from sinkformer.train import trainer

# GCG on every condition costs minutes on 2 cores; the story takes a quick look.
STORY_GCG = ["gcg.targets=4", "gcg.lengths=(4, 8, 16)", "gcg.steps=10", "gcg.candidates=32"]


def _phase(title: str):
  print(f"\n=== {title} ===", flush=True)


def encyclopedia_data(cfg, enc: str, people: int, forget: int, holdout: int):
  """(`cfg` trained on a generated encyclopedia of `people` fictional people in `enc`, written
  once, whose last `holdout` people are held out as never-seen documents; the forget keys:
  the first `forget` people)."""
  if not os.path.exists(os.path.join(enc, "facts.jsonl")):
    _phase(f"encyclopedia: {people} fictional people")
    encyclopedia.write(enc, people, cfg.seed)
  forget_keys, holdout_keys = split_keys([f"person-{i:06d}" for i in range(people)], forget,
                                         holdout)
  return on_corpus(cfg, os.path.join(enc, "corpus.jsonl"), holdout_keys), forget_keys


def split_keys(keys: list[str], forget: int, holdout: int) -> tuple[list[str], list[str]]:
  """(the forget set, the never-seen set) of a generated corpus's source keys: the first
  `forget` and the last `holdout`. Generated sources are drawn independently, so these are
  as random a sample as any, and they stay the same as the corpus grows."""
  if forget + holdout > len(keys):
    raise UserError(f"forget {forget} + holdout {holdout} sources exceed the {len(keys)} there are")
  return keys[:forget], keys[len(keys) - holdout:]


def on_corpus(cfg, corpus: str, holdout_keys: list[str]):
  """`cfg` trained on the JSONL `corpus` with exactly `holdout_keys` held out (listed beside
  the corpus)."""
  corpus = os.path.abspath(corpus)
  listing = os.path.join(os.path.dirname(corpus), f"holdout-{len(holdout_keys)}.txt")
  with open(listing, "w") as f:
    f.write("\n".join(holdout_keys) + "\n")
  cfg = cfg.copy_and_resolve_references()
  cfg.data.update(corpus=corpus, val_sources=0, holdout="@" + listing)
  return cfg


def trained(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) and bool(
      os.listdir(os.path.join(path, "checkpoints")))


RUNS = {"null": "the NULL",
        "oracle": "its retrain oracle: the same config, seed and data order, without the "
                  "forget set",
        "oracle2": "a second retrain oracle, another model seed: the retrains' own spread",
        "dense": "the dense control with the NULL's total parameters (MLP width G + P)",
        "dense_active": "the dense control with the NULL's active parameters (width G + k)"}


def variant(cfg, name: str, forget_keys: list[str]):
  """The config of a run of RUNS, from the NULL's: the one place an oracle or a control is
  defined. An oracle excludes the forget set on top of what the NULL already excluded."""
  if name not in RUNS:
    raise UserError(f"unknown run {name!r}; one of {', '.join(RUNS)}")
  c = cfg.copy_and_resolve_references()
  if name.startswith("oracle"):
    c.data.exclude = ",".join(filter(None, [c.data.exclude, *forget_keys]))
  if name == "oracle2":
    c.seed += 1
  if name.startswith("dense"):   # a control has no sinks to keep private from the rest
    c.model.kind = "dense"
    c.train.dp.clip = 0.0
  if name == "dense_active":
    c.sinks.num = c.sinks.k
  return c


def train_runs(cfg, runs: dict, forget_keys: list[str]):
  """Train what is missing of `runs` {name of RUNS: run directory}. A run that has
  checkpoints is kept (a resumed story or sweep)."""
  for name, path in runs.items():
    if not trained(path):
      _phase(f"train {name}: {RUNS[name]}")
      trainer.train(variant(cfg, name, forget_keys), path)


def run(cfg, workdir: str, people: int = 400, forget: int = 20, holdout: int = 20,
        posthoc_steps: int = 10, relearn_steps: int = 10) -> dict:
  os.makedirs(workdir, exist_ok=True)
  enc = os.path.join(workdir, "encyclopedia")
  cfg, forget_keys = encyclopedia_data(cfg, enc, people, forget, holdout)
  runs = {name: os.path.join(workdir, name) for name in ("null", "oracle", "dense", "npo", "ga")}
  train_runs(cfg, {name: runs[name] for name in ("null", "oracle", "dense")}, forget_keys)
  for method in ("npo", "ga"):
    if not trained(runs[method]):
      _phase(f"post-hoc {method} on the dense control ({posthoc_steps} steps)")
      posthoc.unlearn(runs["dense"], forget_keys, method, posthoc_steps, 1e-4, 0.1, runs[method])

  _phase("unlearning in the NULL: before and after")
  server = serving.Server(runs["null"])
  victim = server.board.catalog.get(forget_keys[0])
  prompt = f"{victim['title']} was born in the year"
  if victim["status"] == "active":   # (a resumed story has unlearned it already)
    before = server.generate([prompt], f"source:{victim['key']}")[0]["text"]
    print(f"before, source:{victim['key']}: {prompt} >> {before}")
  request = switchboard.Switchboard(runs["null"]).unlearn(forget_keys, "sinkformer story")
  print(f"unlearned {len(request['changed'])} sources (request {request['request_id']})")
  after = serving.Server(runs["null"]).generate([prompt], "route")[0]
  print(f"after, {after['mode']} -> {after['source']}: {prompt} >> {after['text']}")

  others = {"dense": runs["dense"], "npo": runs["npo"], "ga": runs["ga"]}
  try:
    clozes = fetch.fetch("questions-words")
  except UserError as e:
    print(f"capability: world-fact clozes skipped: {e}")
    clozes = None
  ctx = context.Context(runs["null"], forget_keys, runs["oracle"], others,
                        os.path.join(workdir, "eval"),
                        context.settings(runs["null"], [f"relearn.steps={relearn_steps}",
                                                        *STORY_GCG]),
                        os.path.join(enc, "facts.jsonl"), clozes)
  results = suites.run(ctx, list(suites.SUITES), resume=True)
  print(f"\nall tables and plots on one page: {ctx.out}/index.md")
  print(f"next: sinkformer serve --run {runs['null']} (the unlearned NULL over HTTP) | "
        f"sinkformer sources list --run {runs['null']} --status unlearned | sinkformer sweep "
        "--config experiments/scale.py --workdir runs/scale (the map along sources)")
  return results
