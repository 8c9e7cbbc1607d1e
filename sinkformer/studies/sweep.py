"""`sinkformer sweep`: the regime map. Where does a NULL's sink-off forget like a retrain?

For each point of the config's `sweep.points` (overrides of a centre config, one axis at a
time: sources, passes, k/P, G/I, model size, leak variants), on a generated encyclopedia:
train the NULL, two retrain oracles (the forget set excluded; two model seeds: how far
retrains land from each other is the noise floor) and two dense controls (the NULL's total
and its active parameters; shared by points whose dense models are the same), run the facts,
membership-inference, capability and relearning suites, and read the exclusion capacity.
One page, WORKDIR/index.md (regimes.json, .md, .png), says per point whether sink-off is
retrain-like: the KS forget quality of unique facts over per-source means >= 0.05, and the
paired 95% CI of its membership AUC gap (Min-40%) to the retrain reaching within the two
retrains' own gap. Every step writes into WORKDIR and is not redone, so an interrupted sweep
resumes; `--points` measures some points, and the page shows every point measured so far.

A point is "LABEL: section.field=value, ..."; the sweep's own settings (`sweep.corpus`:
encyclopedia or wiki-vital, `sweep.articles`, `sweep.source_size` (articles per source),
`sweep.forget` and `sweep.holdout` (in sources)) are overridden
per point like config fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import ml_collections
import numpy as np

from sinkformer import config
from sinkformer.data import encyclopedia, fetch, probes
from sinkformer.errors import UserError
from sinkformer.eval import context, suites
from sinkformer.serve import serving
from sinkformer.studies import story

SUITES = ("facts", "mia", "capability", "relearn")
KS_LEVEL = 0.05      # "retrain-like" facts: KS p over per-source means >= 0.05
MIA_SCORE = "min_k"  # MUSE's Min-40%


def parse_point(spec: str) -> tuple[str, dict]:
  """'k=4: sinks.k=4, train.steps=80' -> ('k=4', {'sinks.k': '4', 'train.steps': '80'}): the
  values as written, parsed with the field's type when applied (point_config)."""
  label, _, rest = spec.partition(":")
  overrides = {}
  for item in filter(None, (x.strip() for x in rest.split(","))):
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise UserError(f"sweep point {spec!r}: {item!r} is not [SECTION.]FIELD=VALUE")
    overrides[key.strip()] = value.strip()
  if not label.strip() or "," in label:
    raise UserError(f"sweep point {spec!r}: its label (before ':') must be non-empty and "
                    "have no comma (--points is a comma-separated list of labels)")
  return label.strip(), overrides


def point_config(cfg, overrides: dict):
  """(the training config, the sweep settings) of a point: its overrides applied to the
  centre (sweep.* fields included) by the command line's parser (config.override)."""
  full = config.override(cfg, [f"{key}={value}" for key, value in overrides.items()],
                         "sweep point")
  c = ml_collections.ConfigDict({k: v for k, v in full.to_dict().items() if k != "sweep"})
  return c, dict(full.sweep.to_dict())


def dense_key(cfg) -> str:
  """Points whose dense control is the same model on the same data share it: the sinks'
  settings and the NULL-only optimizer scales do not change it, only the MLP's width (of a
  story.variant's config: G + P, or G + k for the active-matched control)."""
  d = cfg.to_dict()
  d["model"]["mlp_backbone"] += d["sinks"]["num"]
  d["model"].pop("kind")
  d.pop("sinks")
  d["train"] = {k: v for k, v in d["train"].items()   # NULL-only: a control never has them
                if not k.startswith("backbone_") and k != "dp"}
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def slug(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9.=+-]+", "_", label).strip("_")


def run(cfg, workdir: str, only: list[str] | None = None) -> list[dict]:
  if "sweep" not in cfg:
    raise UserError("the config has no sweep section: use experiments/regimes.py (or add "
                    "sweep.points to yours)")
  points = [parse_point(p) for p in cfg.sweep.points]
  labels = [label for label, _ in points]
  if len({slug(label) for label in labels}) != len(labels):   # a point's directory
    raise UserError(f"sweep points need labels that stay distinct as directory names "
                    f"({', '.join(slug(label) for label in labels)})")
  unknown = sorted(set(only or ()) - set(labels))
  if unknown:
    raise UserError(f"--points {','.join(unknown)}: not among {', '.join(labels)}")
  for label, overrides in points:
    if only and label not in only:
      continue
    print(f"\n##### sweep point {label} {overrides or '(the centre)'}", flush=True)
    row = _point(cfg, workdir, label, overrides)
    with open(os.path.join(workdir, "points", slug(label), "summary.json"), "w") as f:
      json.dump(row, f, indent=1)
    write_page(workdir, measured(workdir, labels))
  return measured(workdir, labels)


def measured(workdir: str, labels: list[str]) -> list[dict]:
  """The summaries of the points measured so far (by this or an earlier invocation), in the
  config's order, each with its NULL's held-out NLL relative to the first point's (the centre)
  where both are measured on the same documents."""
  rows = []
  for label in labels:
    path = os.path.join(workdir, "points", slug(label), "summary.json")
    if os.path.exists(path):
      with open(path) as f:
        rows.append(json.load(f))
  same_data = lambda r: (r["corpus"], r["sources"], r["source_size"], r["forget"])
  centre = rows[0] if rows and rows[0]["point"] == labels[0] else None
  for r in rows:
    r["nll_vs_centre"] = (r["nll/null sink-off/exclude"] / centre["nll/null sink-off/exclude"] - 1
                          if centre and same_data(r) == same_data(centre) else None)
  return rows


def _point(cfg, workdir: str, label: str, overrides: dict) -> dict:
  c, s = point_config(cfg, overrides)
  c, forget_keys, facts = corpus(c, s, os.path.join(workdir, "corpora"))
  here = os.path.join(workdir, "points", slug(label))
  runs = {name: os.path.join(here, name) for name in ("null", "oracle", "oracle2")}
  runs.update({name: os.path.join(workdir, "dense", dense_key(story.variant(c, name, [])))
               for name in ("dense", "dense_active")})
  story.train_runs(c, runs, forget_keys)
  clozes = fetch.fetch("questions-words") if s["clozes"] else None
  ctx = context.Context(runs["null"], forget_keys, runs["oracle"],
                        {name: runs[name] for name in ("dense", "dense_active")},
                        os.path.join(here, "eval"), context.settings(runs["null"]),
                        facts, clozes, runs["oracle2"])
  results = suites.run(ctx, list(SUITES), resume=True)
  # `forget` random sources excluded, the rest sampled (the run's switchboard is untouched)
  sources = s["articles"] // s["source_size"]
  capacity = serving.capacity(runs["null"], [s["forget"]], sample=max(1, sources // 2))
  return summarise(label, overrides, c, s, results, capacity, runs["null"])


def corpus(c, s: dict, root: str):
  """(`c` on the point's corpus, the forget keys, its probe facts) for sweep.corpus:
  "encyclopedia" (`articles` generated people: the people are drawn independently, so the
  first and the last are as good a random sample as any) or "wiki-vital" (a seeded sample
  of `articles` Vital Articles' lead sections, probes from `sinkformer data probes`; the
  forget and held-out sets drawn at random from one pool, the forget set among articles
  with unique-sentence probes). With `source_size` > 1 (encyclopedia), a source is a "book"
  of that many consecutive articles (data.source_by = group)."""
  n, size, forget, holdout = s["articles"], s["source_size"], s["forget"], s["holdout"]
  if size < 1 or n % size:
    raise UserError(f"sweep.source_size={size} must divide sweep.articles={n}")
  if forget + holdout > n // size:
    raise UserError(f"sweep: forget {forget} + holdout {holdout} sources exceed the "
                    f"{n // size} sources")
  if s["corpus"] == "encyclopedia":
    enc = os.path.join(root, f"encyclopedia-{n}-seed{c.seed}")
    if not os.path.exists(os.path.join(enc, "facts.jsonl")):
      encyclopedia.write(enc, n, c.seed)
    if size > 1:
      enc = _books(enc, size)
      c = c.copy_and_resolve_references()
      c.data.source_by = "group"
    path, facts = os.path.join(enc, "corpus.jsonl"), os.path.join(enc, "facts.jsonl")
    keys = list(dict.fromkeys(_records(path, "group" if size > 1 else "key")))
    forget_keys, holdout_keys = story.split_keys(keys, forget, holdout)
    return story.on_corpus(c, path, holdout_keys), forget_keys, facts
  if s["corpus"] != "wiki-vital" or size != 1:
    raise UserError(f"sweep.corpus={s['corpus']!r} with source_size {size}: expected "
                    "encyclopedia, or wiki-vital with source_size 1")
  out = os.path.join(root, f"wiki-vital-{n}-seed{c.seed}")
  path, facts = os.path.join(out, "corpus.jsonl"), os.path.join(out, "facts.jsonl")
  if not os.path.exists(facts):
    with open(fetch.fetch("wiki-vital")) as f:
      records = [line for line in f if line.strip()]
    if n > len(records):
      raise UserError(f"sweep.articles={n}: wiki-vital has {len(records)} articles")
    os.makedirs(out, exist_ok=True)
    pick = np.sort(np.random.default_rng(c.seed).choice(len(records), n, replace=False))
    with open(path, "w") as f:
      f.writelines(records[i] for i in pick)
    probes.write(path, facts, c.seed)
  keys = _records(path, "key")
  with open(facts) as f:
    probed = {p["source"] for p in map(json.loads, f) if p["category"] == "unique"}
  pool = [keys[i] for i in np.random.default_rng((c.seed, 2)).permutation(len(keys))]
  forget_keys = [k for k in pool if k in probed][:forget]   # one pool, drawn at random
  held = [k for k in pool if k not in set(forget_keys)][:holdout]
  return story.on_corpus(c, path, held), forget_keys, facts


def _records(path: str, field: str) -> list:
  with open(path) as f:
    return [json.loads(line)[field] for line in f if line.strip()]


def _books(enc: str, size: int) -> str:
  """The encyclopedia with every `size` consecutive articles one source ("book-N", their
  group), its facts about books: a fact's source and `stated_in` become books."""
  out = f"{enc}-books-{size}"
  if os.path.exists(os.path.join(out, "facts.jsonl")):
    return out
  os.makedirs(out, exist_ok=True)
  book = {}
  with open(os.path.join(enc, "corpus.jsonl")) as f, \
      open(os.path.join(out, "corpus.jsonl"), "w") as g:
    for i, line in enumerate(filter(str.strip, f)):
      r = json.loads(line)
      book[r["key"]] = r["group"] = f"book-{i // size:05d}"
      g.write(json.dumps(r) + "\n")
  with open(os.path.join(enc, "facts.jsonl")) as f, \
      open(os.path.join(out, "facts.jsonl.partial"), "w") as g:
    for line in filter(str.strip, f):
      fact = json.loads(line)
      fact["source"] = book[fact["source"]]
      fact["stated_in"] = list(dict.fromkeys(book[k] for k in fact["stated_in"]))
      g.write(json.dumps(fact) + "\n")
  os.replace(os.path.join(out, "facts.jsonl.partial"), os.path.join(out, "facts.jsonl"))
  return out


def _passes(run_dir: str) -> float:
  """Epochs over the training data at the run's last step (metrics.jsonl)."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return max(json.loads(line).get("epoch", 0.0) for line in f if line.strip())


def summarise(label, overrides, c, s, results, capacity, null_dir) -> dict:
  facts = {(r["set"], r["category"], r["condition"]): r for r in results["facts"]["rows"]}
  mia = {r["condition"]: r for r in results["mia"]["rows"] if r["score"] == MIA_SCORE}
  cap = {r["model"]: r for r in results["capability"]["rows"] if r["metric"] == "held_out_nll"}
  relearn = {r["condition"]: r for r in results["relearn"]["rows"] if r["metric"] == "nll"}
  lost = next(r for r in capacity if r["unlearned"] == s["forget"])
  row = {"point": label, "overrides": overrides, "corpus": s["corpus"],
         "sources": s["articles"] // s["source_size"], "source_size": s["source_size"],
         "forget": s["forget"], "holdout": s["holdout"],
         "passes": _passes(null_dir), "k/P": c.sinks.k / c.sinks.num,
         "G/I": c.model.mlp_backbone / (c.model.mlp_backbone + c.sinks.num),
         "d_model": c.model.d_model, "noise_floor": results["mia"]["noise_floor"].get(MIA_SCORE)}
  for cond in ("sink-on", "sink-off/exclude", "sink-off/route", "backbone", "all-mlp-off",
               "retrain", "retrain-2"):
    f = facts[("forget", "unique", cond)]
    row[f"tr_unique/{cond}"] = f["mean_log_tr"]
    row[f"tr_unique_ci/{cond}"] = [f["log_tr_ci_lo"], f["log_tr_ci_hi"]]
    m = mia[cond]
    row[f"auc/{cond}"] = m["auc"]
    row[f"auc_ci/{cond}"] = [m["auc_lo"], m["auc_hi"]]
    row[f"gap_ci/{cond}"] = None if m["gap_lo"] is None else [m["gap_lo"], m["gap_hi"]]
  # what the sinks hold: sink-on against the backbone on the forget set
  row["sinks_hold/tr"] = row["tr_unique/sink-on"] - row["tr_unique/backbone"]
  row["sinks_hold/auc"] = row["auc/sink-on"] - row["auc/backbone"]
  for cond in ("sink-off/exclude", "backbone"):
    f = facts[("forget", "unique", cond)]
    row[f"ks_unique/{cond}"] = f["forget_quality_sources"]
    row[f"retrain_like/{cond}"] = bool(f["forget_quality_sources"] >= KS_LEVEL
                                       and mia[cond]["retrain_like"])
  for cat in ("shared", "inferred"):
    for cond in ("sink-off/exclude", "retrain"):
      key = ("forget", cat, cond)
      row[f"tr_{cat}/{cond}"] = facts[key]["mean_log_tr"] if key in facts else None
  for model in cap:
    row[f"nll/{model}"] = cap[model]["mean"]
    for control in ("dense", "dense_active"):
      row[f"nll_vs_{control}/{model}"] = cap[model][f"vs_{control}"]
  row["nll_cost"] = row["nll/null sink-off/exclude"] / row["nll/dense"] - 1
  row["nll_cost_active"] = row["nll/null sink-off/exclude"] / row["nll/dense_active"] - 1
  for cond in ("sink-off/exclude", "retrain", "dense"):
    row[f"relearn/{cond}"] = relearn[cond]["change"] if cond in relearn else None
  row["capacity_lost"] = lost["mean"]
  return row


def _ci(value, bounds, fmt="{:.3f}"):
  return "-" if value is None else fmt.format(value) + (
      "" if not bounds else " [" + ", ".join(fmt.format(b) for b in bounds) + "]")


# (heading, how a row shows it) of the page's table
COLUMNS = (
    ("point", lambda r: r["point"]), ("sources", lambda r: str(r["sources"])),
    ("articles/source", lambda r: str(r["source_size"])),
    ("passes", lambda r: f"{r['passes']:.1f}"), ("k/P", lambda r: f"{r['k/P']:.3f}"),
    ("G/I", lambda r: f"{r['G/I']:.2f}"), ("d", lambda r: str(r["d_model"])),
    ("TR sink-on", lambda r: _ci(r["tr_unique/sink-on"], r["tr_unique_ci/sink-on"])),
    ("TR sink-off", lambda r: _ci(r["tr_unique/sink-off/exclude"],
                                  r["tr_unique_ci/sink-off/exclude"])),
    ("TR backbone", lambda r: f"{r['tr_unique/backbone']:.3f}"),
    ("TR retrain", lambda r: _ci(r["tr_unique/retrain"], r["tr_unique_ci/retrain"])),
    ("KS p sink-off", lambda r: f"{r['ks_unique/sink-off/exclude']:.3g}"),
    ("sinks hold (AUC sink-on - backbone)", lambda r: f"{r['sinks_hold/auc']:+.3f}"),
    ("AUC sink-off", lambda r: _ci(r["auc/sink-off/exclude"], r["auc_ci/sink-off/exclude"])),
    ("AUC backbone", lambda r: f"{r['auc/backbone']:.3f}"),
    ("AUC all-MLP-off", lambda r: f"{r['auc/all-mlp-off']:.3f}"),
    ("AUC retrain", lambda r: _ci(r["auc/retrain"], r["auc_ci/retrain"])),
    ("AUC retrain-2", lambda r: f"{r['auc/retrain-2']:.3f}"),
    ("gap sink-off [CI]", lambda r: _ci(r["auc/sink-off/exclude"] - r["auc/retrain"],
                                        r["gap_ci/sink-off/exclude"], "{:+.3f}")),
    ("floor", lambda r: _ci(r["noise_floor"], None)),
    ("NLL vs dense", lambda r: r["nll_vs_dense/null sink-off/exclude"]),
    ("NLL vs dense-active", lambda r: r["nll_vs_dense_active/null sink-off/exclude"]),
    ("relearn sink-off / retrain", lambda r: _ci(r["relearn/sink-off/exclude"], None, "{:+.3f}")
     + " / " + _ci(r["relearn/retrain"], None, "{:+.3f}")),
    ("sinks lost", lambda r: f"{r['capacity_lost']:.3f}"),
    ("sink-off retrain-like", lambda r: str(r["retrain_like/sink-off/exclude"])),
    ("backbone retrain-like", lambda r: str(r["retrain_like/backbone"])))


def table(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(str(show(r)) for _, show in COLUMNS) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_page(workdir: str, rows: list[dict]):
  """regimes.json, regimes.md (the table), regimes.png, regimes_sources.png and index.md."""
  with open(os.path.join(workdir, "regimes.json"), "w") as f:
    json.dump(rows, f, indent=1)
  md = table(rows)
  with open(os.path.join(workdir, "regimes.md"), "w") as f:
    f.write(md)
  print(md)
  _plot(os.path.join(workdir, "regimes.png"), rows)
  _plot_sources(os.path.join(workdir, "regimes_sources.png"), rows)
  legend = ("Unique facts of the forget sources: mean log Truth Ratio (TR) with its 95% CI "
            "(sources resampled), KS forget quality against the retrain over per-source means "
            f"(KS p); membership AUC ({MIA_SCORE}, forget vs never-seen documents; 0.5 = "
            "indistinguishable) with its CI; the gap to the retrain with its paired CI, and "
            "the floor: how far a second retrain (another seed) lands from the first. What the "
            "sinks hold: sink-on's AUC over the backbone's (forgetting is only a claim where "
            "they hold something). Held-out NLL of the deployed path against the dense control "
            "of the same total parameters and the one of the same active parameters (paired "
            "difference, its CI); relearn: NLL change on held-apart forget documents after "
            "the attack at the rate chosen on others; sinks lost = mean share of a retained "
            "source's sinks zeroed by excluding the forget set. Retrain-like: KS p >= "
            f"{KS_LEVEL} and the gap's CI reaching within the floor.")
  with open(os.path.join(workdir, "index.md"), "w") as f:
    f.write(f"# sinkformer sweep: the regime map\n\n{legend}\n\n{md}\n![regimes](regimes.png)\n\n"
            "![AUC gaps against sources](regimes_sources.png)\n\n"
            + "".join(f"- {r['point']}: points/{slug(r['point'])}/eval/index.md\n" for r in rows))


def _gaps(rows, cond):
  """(gap, [lower, upper] error bars) of `cond`'s AUC gap to the retrain, per row."""
  gap = np.asarray([r[f"auc/{cond}"] - r["auc/retrain"] for r in rows])
  ci = np.asarray([r[f"gap_ci/{cond}"] for r in rows])
  return gap, np.abs(ci.T - gap)


def _plot(path: str, rows: list[dict]):
  plt = context.pyplot()
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  ax = axes[0]
  for shift, (cond, marker) in enumerate((("sink-off/exclude", "o"), ("backbone", "s"))):
    gap, err = _gaps(rows, cond)
    ax.errorbar(x + 0.15 * shift, gap, yerr=err, fmt=marker, capsize=3, label=cond)
  floor = np.asarray([r["noise_floor"] or 0.0 for r in rows])
  ax.fill_between(x, -floor, floor, color="green", alpha=0.15, step="mid",
                  label="second retrain's gap")
  ax.axhline(0, color="grey", lw=0.5)
  ax.set_ylabel(f"membership AUC - retrain's ({MIA_SCORE}, 95% CI)")
  ax = axes[1]
  for cond, marker in (("sink-off/exclude", "o"), ("backbone", "s")):
    ax.semilogy(x, [max(r[f"ks_unique/{cond}"], 1e-12) for r in rows], marker, label=cond)
  ax.axhline(KS_LEVEL, color="green", label=f"p = {KS_LEVEL}")
  ax.set_ylabel("KS forget quality, unique facts (per source)")
  ax = axes[2]
  ax.bar(x - 0.2, [100 * r["nll_cost"] for r in rows], 0.4, label="vs dense (total)")
  ax.bar(x + 0.2, [100 * r["nll_cost_active"] for r in rows], 0.4, label="vs dense (active)")
  ax.set_ylabel("held-out NLL of sink-off vs dense (%)")
  for ax in axes:
    ax.set_xticks(x, [r["point"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# What a point along the number of sources may change besides the sources and passes: the
# schedule's bookkeeping, never the model or the optimisation.
ALONG_SOURCES = {"sweep.articles", "sweep.forget", "sweep.holdout", "train.steps",
                 "train.warmup_steps", "train.eval_every", "train.checkpoint_every",
                 "train.log_every", "seed"}


def along_sources(rows: list[dict]) -> list[dict]:
  """The points of a map that differ from its centre only in sources and passes."""
  return [r for r in rows if r["corpus"] == "encyclopedia" and r["source_size"] == 1
          and set(r["overrides"]) <= ALONG_SOURCES]


def pass_groups(rows: list[dict], tolerance: float = 1.25) -> list[list[dict]]:
  """Points grouped by their number of passes, those within `tolerance` x of each other
  together (a schedule's integer steps make 1.5 passes 1.4 at another size)."""
  groups = []
  for r in sorted(rows, key=lambda r: r["passes"]):
    if groups and r["passes"] <= groups[-1][0]["passes"] * tolerance:
      groups[-1].append(r)
    else:
      groups.append([r])
  return groups


def _plot_sources(path: str, rows: list[dict]):
  """The AUC gaps of sink-off and backbone against the number of sources (log axis), one
  line per number of passes (rounded), for the points that vary only those."""
  plt = context.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for group in pass_groups(along_sources(rows)):
    group = sorted(group, key=lambda r: r["sources"])
    passes = float(np.median([r["passes"] for r in group]))
    for cond, style in (("sink-off/exclude", "o-"), ("backbone", "s--")):
      gap, err = _gaps(group, cond)
      ax.errorbar([r["sources"] for r in group], gap, yerr=err, fmt=style, capsize=3,
                  label=f"{cond}, ~{passes:.2g} passes")
  ax.axhline(0, color="grey", lw=0.5)
  ax.set_xscale("log")
  ax.set_xlabel("sources")
  ax.set_ylabel(f"membership AUC - retrain's ({MIA_SCORE}, 95% CI)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
