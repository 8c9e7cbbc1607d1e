"""Commands on a trained run: unlearn, reactivate, list/show/search sources, capacity,
generate, and serve it over HTTP."""

from __future__ import annotations

import json

from absl import flags

from sinkformer import config as config_lib
from sinkformer.cli.common import Command, refs, run_flag
from sinkformer.errors import UserError


def _unlearn_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_string("reason", None, "why (kept in the ledger)", flag_values=fv)
  flags.DEFINE_string("who", None, "who asked (default: this user)", flag_values=fv)
  flags.DEFINE_string("file", None, "a file of sources, one per line", flag_values=fv)
  flags.DEFINE_boolean("all_matching", False, "take every source a reference names (a title "
                       "several sources share, a bare name that is one source's id and "
                       "another's title) instead of refusing it as ambiguous", flag_values=fv)
  flags.DEFINE_float("wait_s", 30.0, "how long to wait for the run's live servers to put the "
                     "change in force", flag_values=fv)
  flags.DEFINE_boolean("json", False, "print the result as one JSON object (request id, "
                       "sources changed, ledger position, servers reached, return time)",
                       flag_values=fv)


def _in_force(result) -> str:
  """How far the change has reached; an error (exit 2) if a live server did not confirm it."""
  got = result["in_force"]
  if got["late"]:
    raise UserError(f"committed and ledgered (request {result['request_id']}, ledger entry "
                    f"{result['ledger_seq']}), but the live server(s) {', '.join(got['late'])} "
                    f"did not confirm it within {got['waited_s']:.0f} s (stuck or overloaded?); "
                    "each refuses the source from its next batch or chunk. Check "
                    "'in_force_seq' on its /healthz")
  return (f"; in force in {got['servers']} live server(s) after {1e3 * got['waited_s']:.0f} ms"
          if got["servers"] else "")


def _unlearn(fv, args):
  from sinkformer.run import switchboard
  board = switchboard.Switchboard(fv.run)
  try:
    result = board.unlearn(refs(args, fv.file), fv.reason, fv.who, fv.all_matching, fv.wait_s)
  finally:
    board.close()
  if fv.json:
    print(json.dumps(result), flush=True)
  reached = _in_force(result)   # an error if a live server did not confirm
  if not fv.json:
    print(f"unlearned {len(result['changed'])} source(s)"
          + (f" (request {result['request_id']})" if result["request_id"] else "")
          + (f"; {len(result['unchanged'])} already unlearned" if result["unchanged"] else "")
          + reached, flush=True)


def _reactivate(fv, args):
  from sinkformer.run import directory, switchboard
  cfg = directory.load_config(fv.run)
  board = switchboard.Switchboard(fv.run)
  try:
    result = board.reactivate(refs(args, fv.file), fv.reason, fv.who,
                              allowed=cfg.unlearn.allow_reactivation,
                              all_matching=fv.all_matching, wait_s=fv.wait_s)
  finally:
    board.close()
  print(f"reactivated {len(result['changed'])} source(s) (request {result['request_id']})"
        + _in_force(result), flush=True)


def _rebuild(fv):
  from sinkformer.data import pipeline
  from sinkformer.run import directory, switchboard
  problems = switchboard.verify(fv.run)
  if not problems and not fv.force:
    print(f"{fv.run}: the switchboard and its ledger journal are intact and agree; nothing "
          "to rebuild (--force rebuilds anyway)")
    return
  for p in problems:
    print(f"found: {p}")
  data = pipeline.load(directory.trained_config(fv.run)[0], log=lambda *_: None)
  got = switchboard.rebuild(fv.run, data.catalog, data.sources)
  print(f"rebuilt {fv.run}/{switchboard.FILE}: {got['requests']} ledgered request(s) replayed "
        f"({got['from_database_only']} found only in the old database, "
        f"{got['damaged_journal_lines']} damaged journal line(s) skipped), "
        f"{got['unlearned']} source(s) unlearned; the old files are kept as *.damaged-*")


def _rebuild_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_boolean("force", False, "rebuild even if nothing is wrong", flag_values=fv)


def _verify(fv):
  from sinkformer.run import switchboard
  problems = switchboard.verify(fv.run)
  if problems:
    raise UserError("; ".join(problems) + f". {switchboard.recovery(fv.run)}")
  print(f"{fv.run}: the switchboard and its ledger journal are intact and agree")


def _list_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_enum("status", None, ["active", "unlearned"], "only these", flag_values=fv)
  flags.DEFINE_integer("offset", 0, "skip this many", flag_values=fv)
  flags.DEFINE_integer("limit", 50, "show at most this many", flag_values=fv)


def _print_rows(rows):
  for r in rows:
    print(f"{r['id']:>8}  {r['status']:9s}  {r['key']}  |  {r['title']}"
          + (f"  [{r['group']}]" if r["group"] else ""))


def _list(fv):
  from sinkformer.run import switchboard
  board = switchboard.Switchboard(fv.run)
  counts = board.counts()
  print(", ".join(f"{n:,} {status}" for status, n in sorted(counts.items())))
  _print_rows(board.page(fv.status, fv.offset, fv.limit))


def _show_flags(fv, argv):
  run_flag(fv)


def _show(fv, args):
  from sinkformer.run import switchboard
  board = switchboard.Switchboard(fv.run)
  for row in board.resolve(args, all_matching=True):   # showing every candidate is safe
    print(json.dumps(row))
    for entry in board.ledger(row["id"]):
      print(f"  {entry['at']}  {entry['action']}  request {entry['request_id']}  by "
            f"{entry['who']}: {entry['why']}")


def _search_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_integer("limit", 20, "show at most this many", flag_values=fv)


def _search(fv, args):
  from sinkformer.run import switchboard
  _print_rows(switchboard.Switchboard(fv.run).search(" ".join(args), fv.limit))


def _capacity_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_list("counts", ["1", "10", "100", "1000", "10000"], "numbers of unlearned "
                    "sources to evaluate", flag_values=fv)
  flags.DEFINE_integer("sample", 512, "retained sources measured", flag_values=fv)


def _capacity(fv):
  from sinkformer.serve import serving
  rows = serving.capacity(fv.run, [int(c) for c in fv.counts], fv.sample)
  print("unlearned  expected lost  mean lost  p95 lost  max lost   (fraction of a retained "
        f"source's sinks that `exclude` zeroes; {rows[0]['retained']:,} retained sources "
        "measured)")
  for r in rows:
    print(f"{r['unlearned']:>9,}  {r['expected']:13.4f}  {r['mean']:9.4f}  {r['p95']:8.4f}  "
          f"{r['max']:8.4f}" + ("   <- now" if r["now"] else ""))


def _generate_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_multi_string("prompt", None, "prompt text (repeat for a batch)", flag_values=fv)
  flags.DEFINE_string("mode", "route", "route | source:KEY | backbone | placebo", flag_values=fv)
  flags.DEFINE_enum("policy", None, list(config_lib.POLICIES), "override the run's unlearn.policy",
                    flag_values=fv)
  flags.DEFINE_integer("max_tokens", 32, "tokens to generate at most (as the server's "
                       "max_tokens)", flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "sample from the k best (0 = off)", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=fv)


def _generate(fv):
  from sinkformer.serve import generate, serving
  server = serving.Server(fv.run, fv.step, fv.policy)
  sampling = generate.Sampling(fv.max_tokens, fv.temperature, fv.top_k, fv.top_p)
  for out in server.generate(fv.prompt, fv.mode, sampling, fv.seed):
    print(f"[{out['mode']} -> {out['source'] or 'no sinks'}, policy {out['policy']}] "
          f"{out['prompt']} >> {out['text']}")


def _serve_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_string("host", "127.0.0.1", "address to listen on", flag_values=fv)
  flags.DEFINE_integer("port", 8000, "port to listen on", flag_values=fv)
  flags.DEFINE_string("token_file", None, "file holding the bearer token that /v1/unlearn and "
                      "/v1/reactivate require (or set SINKFORMER_ADMIN_TOKEN); without one "
                      "those routes stay off", flag_values=fv)
  flags.DEFINE_enum("policy", None, list(config_lib.POLICIES), "override the run's unlearn.policy",
                    flag_values=fv)
  flags.DEFINE_integer("max_batch", 32, "prompts decoded together (1: one at a time)",
                       flag_values=fv)
  flags.DEFINE_float("window_ms", 5.0, "how long a request waits for others to batch with",
                     flag_values=fv)
  flags.DEFINE_integer("max_tokens", 256, "largest max_tokens a request may ask", flag_values=fv)
  flags.DEFINE_integer("max_prompt_tokens", 512, "longest prompt, in tokens", flag_values=fv)
  flags.DEFINE_integer("max_prompts", 16, "prompts per request", flag_values=fv)
  flags.DEFINE_integer("max_queue", 256, "requests waiting at most (then 429)", flag_values=fv)
  flags.DEFINE_float("deadline_s", 120.0, "a request's time from arrival to its last token",
                     flag_values=fv)
  flags.DEFINE_integer("max_body_bytes", 4 << 20, "largest request body", flag_values=fv)


def _serve(fv):
  import uvicorn
  from sinkformer.serve import http
  token = http.admin_token(fv.token_file)
  limits = http.Limits(fv.max_prompts, fv.max_prompt_tokens, fv.max_tokens, fv.max_batch,
                       fv.window_ms / 1000, fv.max_queue, fv.deadline_s, fv.max_body_bytes)
  app = http.create_app(fv.run, token, limits, fv.policy)
  print(f"serving {fv.run} on http://{fv.host}:{fv.port} (unlearning over HTTP "
        f"{'on' if token else 'off: no token'}; batches of up to {fv.max_batch})", flush=True)
  uvicorn.run(app, host=fv.host, port=fv.port, log_level="warning")


def _export_flags(fv, argv):
  run_flag(fv)
  flags.DEFINE_string("mode", "backbone", "the fixed mode to export: backbone or source:REF",
                      flag_values=fv)
  flags.DEFINE_enum("format", "hf", ["hf"], "hf: Hugging Face LlamaForCausalLM (config.json, "
                    "model.safetensors, tokenizer)", flag_values=fv)
  flags.DEFINE_string("out", None, "the export directory (must not exist)", flag_values=fv)
  flags.DEFINE_enum("policy", None, list(config_lib.POLICIES), "override the run's unlearn.policy",
                    flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=fv)


def _export(fv):
  from sinkformer.serve import export
  record = export.export(fv.run, fv.mode, fv.out, fv.step, fv.policy)
  print(f"{fv.out}: LlamaForCausalLM of {fv.run} step {record['step']} in mode {fv.mode} "
        f"(policy {record['policy']}, ledger position {record['ledger_seq']}, intermediate "
        f"size {record['intermediate_size']})")


COMMANDS = {
    "export": Command(
        "a run in one fixed mode (backbone or source:REF) as a standard LLaMA in the "
        "Hugging Face format",
        flags=_export_flags, action=_export, required=("run", "out")),
    "serve": Command(
        "serve a run over HTTP (OpenAI-style /v1/completions in every sink mode, live "
        "unlearning, source lookups)",
        flags=_serve_flags, action=_serve, required=("run",)),
    "unlearn": Command(
        "unlearn sources of a run now: no weight changes, ledgered, transactional",
        flags=_unlearn_flags, action=_unlearn, required=("run", "reason"), args="SOURCE..."),
    "sources list": Command(
        "the run's sources and their status",
        flags=_list_flags, action=_list, required=("run",)),
    "sources show": Command(
        "sources and their ledger",
        flags=_show_flags, action=_show, required=("run",), args="SOURCE..."),
    "sources search": Command(
        "sources whose title contains TEXT",
        flags=_search_flags, action=_search, required=("run",), args="TEXT"),
    "sources verify": Command(
        "check the run's switchboard and its ledger journal (integrity, "
        "chain, agreement)",
        flags=_show_flags, action=_verify, required=("run",)),
    "sources rebuild": Command(
        "restore a damaged or missing switchboard from the run's catalog and "
        "every change its ledger journal or old database still holds",
        flags=_rebuild_flags, action=_rebuild, required=("run",)),
    "sources capacity": Command(
        "what the exclude policy costs retained sources, by number unlearned",
        flags=_capacity_flags, action=_capacity, required=("run",)),
    "sources reactivate": Command(
        "turn unlearned sources back on (only if the run's config allows "
        "it); ledgered",
        flags=_unlearn_flags, action=_reactivate, required=("run", "reason"), args="SOURCE..."),
    "generate": Command(
        "generate from a run in a sink mode, never from an unlearned source",
        flags=_generate_flags, action=_generate, required=("run", "prompt")),
}
