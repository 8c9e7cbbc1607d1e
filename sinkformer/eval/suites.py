"""The registry of evaluation suites: one table drives `sinkformer eval --suite`, the story,
the sweep and the results page (OUT/index.md), in this order.

A suite is a function Context -> result dict that writes OUT/NAME.json and OUT/NAME.md
(context.write_table) and any plots; `run` runs suites back to back on one Context, so loaded
runs and documents are shared, and rewrites the page after each.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

from sinkformer.errors import UserError
from sinkformer.eval import attacks, capability, facts, membership
from sinkformer.eval.context import Context


@dataclasses.dataclass(frozen=True)
class Suite:
  title: str                         # its heading on the page
  run: Callable[[Context], dict]
  plots: tuple[str, ...] = ()        # files in OUT shown under its table


SUITES = {
    "facts": Suite("Truth Ratio of probe facts", facts.facts_suite, ("facts_truth_ratio.png",)),
    "mia": Suite("Membership inference (forget vs never-seen documents)", membership.mia_suite),
    "extraction": Suite("Verbatim extraction (32-token prefix, greedy)",
                        membership.extraction_suite),
    "relearn": Suite("Relearning attack", attacks.relearn_suite, ("relearn.png",)),
    "gcg": Suite("GCG extraction: adversarial compression ratio", attacks.gcg_suite,
                 ("gcg.png",)),
    "capability": Suite("Capability: NULL vs dense control", capability.capability_suite,
                        ("capability.png",)),
}
# The notes of a result shown above its table on the page.
NOTES = ("run", "oracle", "attack_mask", "budget", "documents", "probes")


def names(spec: str) -> list[str]:
  """'facts,mia' or 'all' -> suite names, in the registry's order for 'all'."""
  chosen = list(SUITES) if spec == "all" else spec.split(",")
  unknown = [n for n in chosen if n not in SUITES]
  if unknown:
    raise UserError(f"--suite {','.join(unknown)}: expected {', '.join(SUITES)} or all")
  return chosen


def run(ctx: Context, chosen: list[str], resume: bool = False, log=print) -> dict:
  """Run the `chosen` suites on `ctx`; with `resume`, a suite whose NAME.json exists is read
  back (and its table printed) instead of measured again."""
  results = {}
  for name in chosen:
    log(f"\n=== {name}: {SUITES[name].title} ===")
    done = os.path.join(ctx.out, f"{name}.json")
    if resume and os.path.exists(done):
      with open(done) as f, open(os.path.join(ctx.out, f"{name}.md")) as table:
        results[name] = json.load(f)
        log(table.read().rstrip())
    else:
      results[name] = SUITES[name].run(ctx)
    write_page(ctx.out)
  return results


def write_page(out_dir: str):
  """OUT/index.md: all the tables and plots of the suites run so far, on one page."""
  parts = ["# sinkformer eval", ""]
  for name, suite in SUITES.items():
    table = os.path.join(out_dir, f"{name}.md")
    if not os.path.exists(table):
      continue
    with open(os.path.join(out_dir, f"{name}.json")) as f:
      notes = {k: v for k, v in json.load(f).items() if k in NOTES}
    with open(table) as f:
      parts += [f"## {suite.title}", "", "`" + json.dumps(notes) + "`", "", f.read()]
    parts += [f"![{name}]({p})\n" for p in suite.plots if os.path.exists(os.path.join(out_dir, p))]
  with open(os.path.join(out_dir, "index.md"), "w") as f:
    f.write("\n".join(parts))
