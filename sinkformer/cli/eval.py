"""Measuring forgetting: the retrain oracle, post-hoc baselines, and the evaluation suites."""

from __future__ import annotations

from absl import flags

from sinkformer.cli.common import Command, run_flag
from sinkformer.errors import UserError


def _oracle_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_string("forget", None, "sources to leave out: 'a,b,c' or @FILE (keys, titles, "
                      "ids, groups)", flag_values=fv)
  flags.DEFINE_string("workdir", None, "where the oracle run goes", flag_values=fv)


def _oracle(fv):
  """The retrain oracle: the run's own config, seed and data order, minus the forget set."""
  import os
  from sinkformer.data import pipeline
  from sinkformer.run import directory, switchboard
  from sinkformer.studies import story
  from sinkformer.train import trainer
  cfg, identity = directory.trained_config(fv.run)   # the very data the run trained on
  rows = switchboard.Switchboard(fv.run).resolve(pipeline.parse_refs(fv.forget))
  builtin = identity.get("corpus") == "builtin"
  os.makedirs(fv.workdir, exist_ok=True)
  listing = os.path.join(os.path.abspath(fv.workdir), "forget.txt")
  with open(listing, "w") as f:   # ids for the built-in corpus, keys for prepared corpora
    f.write("\n".join(f"id:{r['id']}" if builtin else f"key:{r['key']}" for r in rows) + "\n")
  cfg = story.variant(cfg, "oracle", ["@" + listing])
  print(f"oracle: training {fv.workdir} without {len(rows)} source(s) (listed in {listing})")
  trainer.train(cfg, fv.workdir)


def _eval_flags(fv, argv):
  run_flag(fv)
  from sinkformer.eval import suites
  flags.DEFINE_string("suite", "facts", "what to measure: one or more of "
                      f"{', '.join(suites.SUITES)} (comma-separated), or all", flag_values=fv)
  flags.DEFINE_string("facts", None, "probe facts (facts.jsonl from 'sinkformer data "
                      "encyclopedia' or 'sinkformer data probes'): the facts suite, and the "
                      "relearning attack's Truth Ratio curve", flag_values=fv)
  flags.DEFINE_string("clozes", None, "capability: questions-words JSONL (default: the "
                      "fetched one)", flag_values=fv)
  flags.DEFINE_string("forget", None, "the forget set: 'a,b' or @FILE (every suite but "
                      "capability)", flag_values=fv)
  flags.DEFINE_string("oracle", None, "the retrain oracle run ('sinkformer oracle')",
                      flag_values=fv)
  flags.DEFINE_string("oracle2", None, "a second retrain oracle, another seed (the noise "
                      "floor of the membership gaps)", flag_values=fv)
  flags.DEFINE_string("dense", None, "the dense control run, if any (same total parameters)",
                      flag_values=fv)
  flags.DEFINE_string("dense_active", None, "a dense control with the NULL's active "
                      "parameters (MLP width G + k), if any", flag_values=fv)
  flags.DEFINE_multi_string("posthoc", [], "NAME=RUN: a post-hoc unlearned run to compare "
                            "('sinkformer posthoc'); repeatable", flag_values=fv)
  flags.DEFINE_multi_string("set", [], "override the run's eval config, e.g. relearn.steps=20, "
                            "relearn.mask=sink-on, gcg.steps=100; repeatable", flag_values=fv)
  flags.DEFINE_string("out", None, "where results go (default RUN/eval)", flag_values=fv)


def _eval(fv):
  import os
  from sinkformer.data import fetch, pipeline
  from sinkformer.eval import context, suites
  chosen = suites.names(fv.suite)
  others = {name: path for name, path in (("dense", fv.dense),
                                          ("dense_active", fv.dense_active)) if path}
  for item in fv.posthoc:
    name, eq, path = item.partition("=")
    if not eq:
      raise UserError(f"--posthoc {item!r}: use NAME=RUN_DIR")
    others[name] = path
  ctx = context.Context(fv.run, pipeline.parse_refs(fv.forget), fv.oracle, others,
                        fv.out or os.path.join(fv.run, "eval"),
                        context.settings(fv.run, fv.set), fv.facts,
                        fv.clozes or fetch.corpus_path("questions-words"), fv.oracle2)
  suites.run(ctx, chosen)
  print(f"all results on one page: {os.path.join(ctx.out, 'index.md')}")


def _posthoc_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_string("forget", None, "sources to unlearn: 'a,b' or @FILE", flag_values=fv)
  flags.DEFINE_enum("method", "npo", ["ga", "graddiff", "npo"], "post-hoc method",
                    flag_values=fv)
  flags.DEFINE_integer("steps", 10, "optimizer steps (batches of the forget set, cycling)",
                       flag_values=fv)
  flags.DEFINE_integer("epochs", 0, "passes over the forget documents (replaces --steps)",
                       flag_values=fv)
  flags.DEFINE_float("lr", 1e-4, "learning rate", flag_values=fv)
  flags.DEFINE_float("beta", 0.1, "NPO's beta", flag_values=fv)
  flags.DEFINE_integer("retain", 64, "retain documents (graddiff, npo)", flag_values=fv)
  flags.DEFINE_string("workdir", None, "the unlearned copy (a run directory)", flag_values=fv)


def _posthoc(fv):
  from sinkformer.data import pipeline
  from sinkformer.eval import posthoc
  posthoc.unlearn(fv.run, pipeline.parse_refs(fv.forget), fv.method, fv.steps, fv.lr, fv.beta,
                  fv.workdir, retain=fv.retain, epochs=fv.epochs)
  print(f"{fv.method}: unlearned copy written to {fv.workdir}")


def _attribute_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_string("text", None, "the text to attribute (or the prompt, with --answer)",
                      flag_values=fv)
  flags.DEFINE_string("answer", None, "score only this continuation of --text", flag_values=fv)
  flags.DEFINE_multi_string("source", [], "also consider this source; repeatable",
                            flag_values=fv)
  flags.DEFINE_integer("top", 10, "sources to show", flag_values=fv)
  flags.DEFINE_integer("candidates", 64, "the router's nearest sources to score when the "
                       "catalog is larger than --everyone_below", flag_values=fv)
  flags.DEFINE_integer("everyone_below", 4096, "score every active source of catalogs smaller "
                       "than this", flag_values=fv)
  flags.DEFINE_string("facts", None, "instead of --text: facts.jsonl with known sources "
                      "(sinkformer data encyclopedia): top-1/top-5 against chance",
                      flag_values=fv)
  flags.DEFINE_integer("limit", 100, "facts per category (with --facts)", flag_values=fv)
  flags.DEFINE_string("out", None, "where the JSON and plot go (default RUN/attribution)",
                      flag_values=fv)


def _attribute(fv):
  import json
  import os
  from sinkformer.eval import attribution, context
  from sinkformer.serve import serving
  server = serving.Server(fv.run)
  out = fv.out or os.path.join(fv.run, "attribution")
  os.makedirs(out, exist_ok=True)
  if fv.facts:
    result = attribution.evaluate(server, context.load_facts(fv.facts), fv.limit)
    for category, r in result.items():
      print(f"{category} facts (n={r['facts']}, {r['candidates']} candidate sources; chance: "
            f"top-1 {r['chance_top1']:.3f}, top-5 {r['chance_top5']:.3f}):")
      for scored, what in (("text", "prompt + answer"), ("answer", "the answer alone")):
        got = r[scored]
        print(f"  scoring {what:16s}: a stating source ranks first {got['top1']:.3f}, in the "
              f"top 5 {got['top5']:.3f}; share of the top 5 that states it "
              f"{got['top5_share']:.3f}")
    path = os.path.join(out, "facts.json")
  elif fv.text:
    result = attribution.attribute(server, fv.text, fv.answer, fv.source, fv.top,
                                   top_m=fv.candidates, everyone_below=fv.everyone_below)
    print(f"{result['candidates']} candidate sources; backbone NLL {result['backbone_nll']:.3f} "
          "nats/token")
    print(f"{'rank':>4}  {'gain':>7}  {'NLL':>6}  source")
    for n, r in enumerate(result["ranked"], 1):
      print(f"{n:4d}  {r['gain']:7.3f}  {r['nll']:6.3f}  {r['title']} (id {r['id']}, {r['key']})")
    attribution.plot(result, os.path.join(out, "attribution.png"))
    path = os.path.join(out, "attribution.json")
  else:
    raise UserError("give --text (and optionally --answer), or --facts")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"written to {path}")


COMMANDS = {
    "attribute": Command(
        "which sources taught the model a text: sources ranked by the loss their "
        "sinks remove (a table, JSON and a plot); with --facts, top-1/top-5 where "
        "the truth is known",
        flags=_attribute_flags, action=_attribute, required=("run",)),
    "oracle": Command(
        "train the retrain oracle of a run: same config, seed and order, minus the "
        "forget set",
        flags=_oracle_flags, action=_oracle, required=("run", "forget", "workdir")),
    "posthoc": Command(
        "post-hoc unlearning baselines (gradient ascent, GradDiff, NPO) on a run, "
        "normally the dense control",
        flags=_posthoc_flags, action=_posthoc, required=("run", "forget", "workdir")),
    "eval": Command(
        "measure forgetting under every condition vs the retrain oracle and post-hoc "
        "baselines: facts, membership inference, extraction, relearning, GCG, "
        "capability (JSON, markdown, plots, one page)",
        flags=_eval_flags, action=_eval, required=("run",)),
}
