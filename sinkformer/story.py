"""`sinkformer story`: the whole experiment on one machine, start to finish.

Generate the fictional encyclopedia -> train the NULL on it -> train its retrain oracle
without the forget set -> train the dense control -> unlearn the forget set from the dense
control with NPO and gradient ascent -> unlearn it from the NULL (the switchboard) ->
generate before/after -> measure facts, membership inference and relearning for every
condition side by side. Every step writes into WORKDIR; a step whose output exists is not
redone, so an interrupted story resumes.
"""

from __future__ import annotations

import os

from sinkformer import encyclopedia, evaluate, posthoc, serving, switchboard, train


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
      train.train(c, runs[name])
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
  out = os.path.join(workdir, "eval")
  _phase("facts: Truth Ratio per category and condition")
  facts = evaluate.facts_suite(runs["null"], os.path.join(enc, "facts.jsonl"), forget_keys,
                               runs["oracle"], others, out)
  _phase("membership inference")
  mia = evaluate.mia_suite(runs["null"], forget_keys, runs["oracle"], others, out)
  _phase(f"relearning attack ({relearn_steps} steps)")
  relearn = evaluate.relearn_suite(runs["null"], forget_keys, runs["oracle"], others, out,
                                   relearn_steps)
  print(f"\ntables and plots in {out}/ (facts.md, mia.md, relearn.md, *.png)")
  return {"facts": facts, "mia": mia, "relearn": relearn}
