"""Commands on a trained run: unlearn, sources, generate (registered into cli.COMMANDS)."""

from __future__ import annotations

import json

from absl import flags

from sinkformer.errors import UserError


def _run_flag(fv):
  flags.DEFINE_string("run", None, "the run directory (sinkformer train --workdir)",
                      flag_values=fv)


def _refs(args, file):
  refs = list(args)
  if file:
    from sinkformer import data
    refs += data.parse_refs("@" + file)
  if not refs:
    raise UserError("name at least one source (id:N, key:K, title:T, group:G, or a bare "
                    "name), or --file")
  return refs


def _unlearn_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_string("reason", None, "why (kept in the ledger)", flag_values=fv)
  flags.DEFINE_string("who", None, "who asked (default: this user)", flag_values=fv)
  flags.DEFINE_string("file", None, "a file of sources, one per line", flag_values=fv)
  flags.DEFINE_boolean("all_matching", False, "take every source a reference names (a title "
                       "several sources share, a bare name that is one source's id and "
                       "another's title) instead of refusing it as ambiguous", flag_values=fv)


def _unlearn(fv, args):
  from sinkformer import switchboard
  board = switchboard.Switchboard(fv.run)
  result = board.unlearn(_refs(args, fv.file), fv.reason, fv.who, fv.all_matching)
  board.close()
  print(f"unlearned {len(result['changed'])} source(s)"
        + (f" (request {result['request_id']})" if result["request_id"] else "")
        + (f"; {len(result['unchanged'])} already unlearned" if result["unchanged"] else ""))


def _reactivate(fv, args):
  from sinkformer import serving, switchboard
  cfg = serving.load_config(fv.run)
  board = switchboard.Switchboard(fv.run)
  result = board.reactivate(_refs(args, fv.file), fv.reason, fv.who,
                            allowed=cfg.unlearn.allow_reactivation, all_matching=fv.all_matching)
  board.close()
  print(f"reactivated {len(result['changed'])} source(s) (request {result['request_id']})")


def _list_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_enum("status", None, ["active", "unlearned"], "only these", flag_values=fv)
  flags.DEFINE_integer("offset", 0, "skip this many", flag_values=fv)
  flags.DEFINE_integer("limit", 50, "show at most this many", flag_values=fv)


def _print_rows(rows):
  for r in rows:
    print(f"{r['id']:>8}  {r['status']:9s}  {r['key']}  |  {r['title']}"
          + (f"  [{r['group']}]" if r["group"] else ""))


def _list(fv):
  from sinkformer import switchboard
  board = switchboard.Switchboard(fv.run)
  counts = board.counts()
  print(", ".join(f"{n:,} {status}" for status, n in sorted(counts.items())))
  _print_rows(board.page(fv.status, fv.offset, fv.limit))


def _show_flags(fv, argv):
  _run_flag(fv)


def _show(fv, args):
  from sinkformer import switchboard
  board = switchboard.Switchboard(fv.run)
  for row in board.resolve(args, all_matching=True):   # showing every candidate is safe
    print(json.dumps(row))
    for entry in board.ledger(row["id"]):
      print(f"  {entry['at']}  {entry['action']}  request {entry['request_id']}  by "
            f"{entry['who']}: {entry['why']}")


def _search_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_integer("limit", 20, "show at most this many", flag_values=fv)


def _search(fv, args):
  from sinkformer import switchboard
  _print_rows(switchboard.Switchboard(fv.run).search(" ".join(args), fv.limit))


def _capacity_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_list("counts", ["1", "10", "100", "1000", "10000"], "numbers of unlearned "
                    "sources to evaluate", flag_values=fv)
  flags.DEFINE_integer("sample", 512, "retained sources measured", flag_values=fv)


def _capacity(fv):
  from sinkformer import serving
  rows = serving.capacity(fv.run, [int(c) for c in fv.counts], fv.sample)
  print("unlearned  expected lost  mean lost  p95 lost  max lost   (fraction of a retained "
        "source's sinks that `exclude` zeroes)")
  for r in rows:
    print(f"{r['unlearned']:>9,}  {r['expected']:13.4f}  {r['mean']:9.4f}  {r['p95']:8.4f}  "
          f"{r['max']:8.4f}" + ("   <- now" if r["now"] else ""))


def _generate_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_multi_string("prompt", None, "prompt text (repeat for a batch)", flag_values=fv)
  flags.DEFINE_string("mode", "route", "route | source:KEY | backbone | placebo", flag_values=fv)
  flags.DEFINE_enum("policy", None, ["exclude", "route"], "override the run's unlearn.policy",
                    flag_values=fv)
  flags.DEFINE_integer("max_new", 32, "tokens to generate", flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "sample from the k best (0 = off)", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=fv)


def _generate(fv):
  from sinkformer import generate, serving
  server = serving.Server(fv.run, fv.step, fv.policy)
  sampling = generate.Sampling(fv.max_new, fv.temperature, fv.top_k, fv.top_p)
  for out in server.generate(fv.prompt, fv.mode, sampling, fv.seed):
    print(f"[{out['mode']} -> {out['source'] or 'no sinks'}, policy {out['policy']}] "
          f"{out['prompt']} >> {out['text']}")


def _bench_run_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_integer("rounds", 10, "timed rounds", flag_values=fv)


def _bench_generate(fv):
  from sinkformer import bench
  bench.generation(fv.run, fv.rounds)


def _bench_route(fv):
  from sinkformer import serving
  for text in serving.ROUTER_TEXTS:
    server = serving.Server(fv.run, router_text=text)
    accuracy, n = serving.routing_accuracy(server, limit=10**9)
    print(f"router on {text}: top-1 accuracy {accuracy:.3f} routing each surviving source's "
          f"title back to it ({n:,} sources)")


def _bench_probes_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_string("facts", None, "facts.jsonl ('sinkformer data encyclopedia')",
                      flag_values=fv)
  flags.DEFINE_integer("count", 1000, "probes to score", flag_values=fv)


def _bench_probes(fv):
  from sinkformer import bench
  bench.probes(fv.run, fv.facts, fv.count)


def _bench_unlearn_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_string("catalog", None, "a prepared catalog.sqlite to unlearn from (e.g. the "
                      "6M-source one of 'bench scale'); default: the run's", flag_values=fv)
  flags.DEFINE_integer("requests", 200, "single-source requests timed", flag_values=fv)


def _bench_unlearn(fv):
  from sinkformer import bench
  bench.unlearning(fv.run, fv.catalog, fv.requests)


def _oracle_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_string("forget", None, "sources to leave out: 'a,b,c' or @FILE (keys, titles, "
                      "ids, groups)", flag_values=fv)
  flags.DEFINE_string("workdir", None, "where the oracle run goes", flag_values=fv)


def _oracle(fv):
  """The retrain oracle: the run's own config, seed and data order, minus the forget set."""
  import os
  from sinkformer import data, serving, switchboard, train
  cfg, identity = serving.trained_config(fv.run)   # the very data the run trained on
  rows = switchboard.Switchboard(fv.run).resolve(data.parse_refs(fv.forget))
  builtin = identity.get("corpus") == "builtin"
  os.makedirs(fv.workdir, exist_ok=True)
  listing = os.path.join(os.path.abspath(fv.workdir), "forget.txt")
  with open(listing, "w") as f:   # ids for the built-in corpus, keys for prepared corpora
    f.write("\n".join(f"id:{r['id']}" if builtin else f"key:{r['key']}" for r in rows) + "\n")
  cfg.data.exclude = ",".join(filter(None, [cfg.data.exclude, "@" + listing]))
  print(f"oracle: training {fv.workdir} without {len(rows)} source(s) (listed in {listing})")
  train.train(cfg, fv.workdir)


SUITES = ("facts", "mia", "extraction", "relearn", "gcg", "capability")


def _eval_flags(fv, argv):
  _run_flag(fv)
  flags.DEFINE_string("suite", "facts", f"what to measure: one or more of {', '.join(SUITES)} "
                      "(comma-separated), or all", flag_values=fv)
  flags.DEFINE_string("facts", None, "probe facts (facts.jsonl from 'sinkformer data "
                      "encyclopedia' or 'sinkformer data probes'): the facts suite, and the "
                      "relearning attack's Truth Ratio curve", flag_values=fv)
  flags.DEFINE_string("clozes", None, "capability: questions-words JSONL (default: the "
                      "fetched one)", flag_values=fv)
  flags.DEFINE_string("forget", None, "the forget set: 'a,b' or @FILE (every suite but "
                      "capability)", flag_values=fv)
  flags.DEFINE_string("oracle", None, "the retrain oracle run ('sinkformer oracle')",
                      flag_values=fv)
  flags.DEFINE_string("dense", None, "the dense control run, if any", flag_values=fv)
  flags.DEFINE_multi_string("posthoc", [], "NAME=RUN: a post-hoc unlearned run to compare "
                            "('sinkformer posthoc'); repeatable", flag_values=fv)
  flags.DEFINE_multi_string("set", [], "override the run's eval config, e.g. relearn.steps=20, "
                            "relearn.mask=sink-on, gcg.steps=100; repeatable", flag_values=fv)
  flags.DEFINE_string("out", None, "where results go (default RUN/eval)", flag_values=fv)


def _eval(fv):
  import os
  from sinkformer import attacks, capability, data, evaluate, fetch
  names = list(SUITES) if fv.suite == "all" else fv.suite.split(",")
  unknown = [n for n in names if n not in SUITES]
  if unknown:
    raise UserError(f"--suite {','.join(unknown)}: expected {', '.join(SUITES)} or all")
  others = {"dense": fv.dense} if fv.dense else {}
  for item in fv.posthoc:
    name, eq, path = item.partition("=")
    if not eq:
      raise UserError(f"--posthoc {item!r}: use NAME=RUN_DIR")
    others[name] = path
  ctx = evaluate.Context(fv.run, data.parse_refs(fv.forget), fv.oracle, others,
                         fv.out or os.path.join(fv.run, "eval"),
                         evaluate.settings(fv.run, fv.set), fv.facts,
                         fv.clozes or fetch.corpus_path("questions-words"))
  run = {"facts": evaluate.facts_suite, "mia": evaluate.mia_suite,
         "extraction": evaluate.extraction_suite, "relearn": attacks.relearn_suite,
         "gcg": attacks.gcg_suite, "capability": capability.capability_suite}
  for name in names:
    print(f"=== {name} ===", flush=True)
    run[name](ctx)
  print(f"all results on one page: {os.path.join(ctx.out, 'index.md')}")


def _posthoc_flags(fv, argv):
  _run_flag(fv)
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
  from sinkformer import data, posthoc
  posthoc.unlearn(fv.run, data.parse_refs(fv.forget), fv.method, fv.steps, fv.lr, fv.beta,
                  fv.workdir, retain=fv.retain, epochs=fv.epochs)
  print(f"{fv.method}: unlearned copy written to {fv.workdir}")


COMMANDS = {
    "posthoc": ("post-hoc unlearning baselines (gradient ascent, GradDiff, NPO) on a run, "
                "normally the dense control", _posthoc_flags, _posthoc,
                ("run", "forget", "workdir")),
    "oracle": ("train the retrain oracle of a run: same config, seed and order, minus the "
               "forget set", _oracle_flags, _oracle, ("run", "forget", "workdir")),
    "eval": ("measure forgetting under every condition vs the retrain oracle and post-hoc "
             "baselines: facts, membership inference, extraction, relearning, GCG, "
             "capability (JSON, markdown, plots, one page)", _eval_flags, _eval, ("run",)),
    "unlearn": ("unlearn sources of a run now: no weight changes, ledgered, transactional",
                _unlearn_flags, _unlearn, ("run", "reason"), "SOURCE..."),
    "sources list": ("the run's sources and their status", _list_flags, _list, ("run",)),
    "sources show": ("sources and their ledger", _show_flags, _show, ("run",), "SOURCE..."),
    "sources search": ("sources whose title contains TEXT", _search_flags, _search, ("run",),
                       "TEXT"),
    "sources capacity": ("what the exclude policy costs retained sources, by number unlearned",
                         _capacity_flags, _capacity, ("run",)),
    "sources reactivate": ("turn unlearned sources back on (only if the run's config allows "
                           "it); ledgered", _unlearn_flags, _reactivate, ("run", "reason"),
                           "SOURCE..."),
    "generate": ("generate from a run in a sink mode, never from an unlearned source",
                 _generate_flags, _generate, ("run", "prompt")),
    "bench generate": ("generation tokens/s with the KV cache against without",
                       _bench_run_flags, _bench_generate, ("run",)),
    "bench route": ("routing top-1 accuracy: each surviving source's title routed back to it",
                    _show_flags, _bench_route, ("run",)),
    "bench probes": ("seconds to score N probe facts under one condition (batched)",
                     _bench_probes_flags, _bench_probes, ("run", "facts")),
    "bench unlearn": ("unlearn latency, request to effect on the next generation",
                      _bench_unlearn_flags, _bench_unlearn, ("run",)),
}
