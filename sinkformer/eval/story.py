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

import json
import os

from sinkformer.data import encyclopedia, fetch
from sinkformer.errors import UserError
from sinkformer.eval import attacks, capability, evaluate, posthoc
from sinkformer.serve import serving, switchboard
from sinkformer.train import trainer

# GCG on every condition costs minutes on 2 cores; the story takes a quick look.
STORY_GCG = ["gcg.targets=4", "gcg.lengths=(4, 8, 16)", "gcg.steps=10", "gcg.candidates=32"]


def _phase(title: str):
  print(f"\n=== {title} ===", flush=True)


def run(cfg, workdir: str, people: int = 400, forget: int = 20, holdout: int = 20,
        posthoc_steps: int = 10, relearn_steps: int = 10) -> dict:
  os.makedirs(workdir, exist_ok=True)
  enc = os.path.join(workdir, "encyclopedia")
  keys = [f"person-{i:06d}" for i in range(people)]
  forget_keys, holdout_keys = keys[:forget], keys[-holdout:]
  if not os.path.exists(os.path.join(enc, "facts.jsonl")):
    _phase(f"encyclopedia: {people} fictional people")
    encyclopedia.write(enc, people, cfg.seed)
  listing = os.path.join(workdir, "holdout.txt")
  with open(listing, "w") as f:
    f.write("\n".join(holdout_keys) + "\n")
  cfg = cfg.copy_and_resolve_references()
  cfg.data.update(corpus=os.path.join(enc, "corpus.jsonl"), val_sources=0, holdout="@" + listing)
  runs = {name: os.path.join(workdir, name) for name in ("null", "oracle", "dense", "npo", "ga")}

  def trained(path) -> bool:
    return os.path.exists(os.path.join(path, "checkpoints")) and os.listdir(
        os.path.join(path, "checkpoints"))

  for name, overrides in (("null", {}), ("oracle", {"exclude": ",".join(forget_keys)}),
                          ("dense", {})):
    if not trained(runs[name]):
      _phase(f"train {name}" + (f" (without the {forget} forget sources)" if name == "oracle" else ""))
      c = cfg.copy_and_resolve_references()
      c.data.update(**overrides)
      if name == "dense":
        c.model.kind = "dense"
      trainer.train(c, runs[name])
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
  ctx = evaluate.Context(runs["null"], forget_keys, runs["oracle"], others,
                         os.path.join(workdir, "eval"),
                         evaluate.settings(runs["null"], [f"relearn.steps={relearn_steps}",
                                                          *STORY_GCG]),
                         os.path.join(enc, "facts.jsonl"), clozes)
  results = {}
  for name, title, suite in (
      ("facts", "facts: Truth Ratio per category and condition", evaluate.facts_suite),
      ("mia", "membership inference", evaluate.mia_suite),
      ("extraction", "verbatim extraction", evaluate.extraction_suite),
      ("relearn", f"relearning attack ({relearn_steps} steps)", attacks.relearn_suite),
      ("gcg", "GCG extraction (adversarial compression ratio)", attacks.gcg_suite),
      ("capability", "capability: NULL vs dense control", capability.capability_suite)):
    _phase(title)
    done = os.path.join(ctx.out, f"{name}.json")
    if os.path.exists(done):   # a resumed story: measured already
      with open(done) as f, open(os.path.join(ctx.out, f"{name}.md")) as table:
        results[name] = json.load(f)
        print(table.read(), end="")
    else:
      results[name] = suite(ctx)
  print(f"\nall tables and plots on one page: {ctx.out}/index.md")
  return results
