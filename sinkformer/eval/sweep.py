"""`sinkformer sweep`: the regime map. Where does a NULL's sink-off forget like a retrain?

For each point of the config's `sweep.points` (overrides of a centre config, one axis at a
time: sources, passes, k/P, G/I, model size, leak variants), on a generated encyclopedia:
train the NULL, its retrain oracle (the forget set excluded) and the dense control (shared by
points whose dense model is the same), run the facts, membership-inference and capability
suites, and read the exclusion capacity. One page, WORKDIR/index.md (regimes.json, .md, .png),
says per point whether sink-off is retrain-like: the KS forget quality of unique facts >= 0.05
and the membership AUC (Min-40%) within 0.05 of the retrain's. Every step writes into WORKDIR
and is not redone, so an interrupted sweep resumes; `--points` measures some points, and the
page shows every point measured so far.

A point is "LABEL: section.field=value, ..."; the sweep's own settings (`sweep.corpus`:
encyclopedia or wiki-vital, `sweep.articles`, `sweep.source_size` (articles per source),
`sweep.forget` and `sweep.holdout` (in sources)) are overridden
per point like config fields.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re

import ml_collections
import numpy as np

from sinkformer.data import encyclopedia, fetch, probes
from sinkformer.errors import UserError
from sinkformer.eval import context, story, suites
from sinkformer.serve import serving

SUITES = ("facts", "mia", "capability")
KS_LEVEL, AUC_MARGIN = 0.05, 0.05   # "retrain-like": KS p >= 0.05, |AUC - retrain's| <= 0.05
MIA_SCORE = "min_k"                 # MUSE's Min-40%


def parse_point(spec: str) -> tuple[str, dict]:
  """'k=4: sinks.k=4, train.steps=80' -> ('k=4', {'sinks.k': 4, 'train.steps': 80})."""
  label, _, rest = spec.partition(":")
  overrides = {}
  for item in filter(None, (x.strip() for x in rest.split(","))):
    key, eq, value = item.partition("=")
    if not eq or key.strip().count(".") != 1:
      raise UserError(f"sweep point {spec!r}: {item!r} is not SECTION.FIELD=VALUE")
    try:
      overrides[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[key.strip()] = value.strip()
  if not label.strip() or "," in label:
    raise UserError(f"sweep point {spec!r}: its label (before ':') must be non-empty and "
                    "have no comma (--points is a comma-separated list of labels)")
  return label.strip(), overrides


def point_config(cfg, overrides: dict):
  """(the training config, the sweep settings) of a point."""
  settings = dict(cfg.sweep)
  c = ml_collections.ConfigDict({k: v for k, v in cfg.to_dict().items() if k != "sweep"})
  for key, value in overrides.items():
    section, field = key.split(".")
    target = settings if section == "sweep" else c.get(section)
    if target is None or field not in target:
      raise UserError(f"sweep override {key}={value!r}: no such field")
    try:
      target[field] = value
    except TypeError as e:
      raise UserError(f"sweep override {key}={value!r}: {e}") from None
  return c, settings


def dense_key(cfg) -> str:
  """Points whose dense control is the same model on the same data share it: the sinks'
  settings and the NULL-only optimizer scales do not change it, only the MLP's width."""
  d = cfg.to_dict()
  d["model"]["mlp_backbone"] += d["sinks"]["num"]
  d.pop("sinks")
  d["train"] = {k: v for k, v in d["train"].items() if not k.startswith("backbone_")}
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
    r["nll_vs_centre"] = (r["nll/null"] / centre["nll/null"] - 1
                          if centre and same_data(r) == same_data(centre) else None)
  return rows


def _point(cfg, workdir: str, label: str, overrides: dict) -> dict:
  c, s = point_config(cfg, overrides)
  c, forget_keys, facts = corpus(c, s, os.path.join(workdir, "corpora"))
  here = os.path.join(workdir, "points", slug(label))
  runs = {"null": os.path.join(here, "null"), "oracle": os.path.join(here, "oracle"),
          "dense": os.path.join(workdir, "dense", dense_key(c))}
  story.train_runs(c, runs, forget_keys)
  ctx = context.Context(runs["null"], forget_keys, runs["oracle"], {"dense": runs["dense"]},
                        os.path.join(here, "eval"), context.settings(runs["null"]),
                        facts, None)
  results = suites.run(ctx, list(SUITES), resume=True)
  # `forget` random sources excluded, the rest sampled (the run's switchboard is untouched)
  sources = s["articles"] // s["source_size"]
  capacity = serving.capacity(runs["null"], [s["forget"]], sample=max(1, sources // 2))
  return summarise(label, overrides, c, s, results, capacity, runs["null"])


def corpus(c, s: dict, root: str):
  """(`c` on the point's corpus, the forget keys, its probe facts) for sweep.corpus:
  "encyclopedia" (`articles` generated people) or "wiki-vital" (a seeded sample of `articles`
  Vital Articles' lead sections, probes from `sinkformer data probes`; the forget set is the
  first articles that have unique-sentence probes). With `source_size` > 1 (encyclopedia),
  a source is a "book" of that many consecutive articles (data.source_by = group)."""
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
    return story.on_corpus(c, path, keys[-holdout:]), keys[:forget], facts
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
  forget_keys = [k for k in keys[:-holdout] if k in probed][:forget]
  return story.on_corpus(c, path, keys[-holdout:]), forget_keys, facts


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
  tr = lambda cat, cond: facts[("forget", cat, cond)]["mean_log_tr"]
  mia = {r["condition"]: r["auc"] for r in results["mia"]["rows"] if r["score"] == MIA_SCORE}
  nll = {r["model"]: r["mean"] for r in results["capability"]["rows"]
         if r["metric"] == "held_out_nll"}
  lost = next(r for r in capacity if r["unlearned"] == s["forget"])
  row = {"point": label, "overrides": overrides, "corpus": s["corpus"],
         "sources": s["articles"] // s["source_size"], "source_size": s["source_size"],
         "forget": s["forget"],
         "passes": _passes(null_dir), "k/P": c.sinks.k / c.sinks.num,
         "G/I": c.model.mlp_backbone / (c.model.mlp_backbone + c.sinks.num),
         "d_model": c.model.d_model}
  for cond in ("sink-on", "sink-off/exclude", "sink-off/route", "backbone", "all-mlp-off",
               "retrain"):
    row[f"tr_unique/{cond}"] = tr("unique", cond)
    row[f"auc/{cond}"] = mia[cond]
  for cond in ("sink-off/exclude", "backbone"):
    row[f"ks_unique/{cond}"] = facts[("forget", "unique", cond)]["forget_quality"]
  for cat in ("shared", "inferred"):
    for cond in ("sink-off/exclude", "retrain"):
      key = ("forget", cat, cond)
      row[f"tr_{cat}/{cond}"] = facts[key]["mean_log_tr"] if key in facts else None
  row["nll/null"] = nll["null sink-off/exclude"]
  row["nll/dense"] = nll["dense"]
  row["nll_cost"] = row["nll/null"] / row["nll/dense"] - 1
  row["capacity_lost"] = lost["mean"]
  for cond in ("sink-off/exclude", "backbone"):
    row[f"retrain_like/{cond}"] = bool(
        row[f"ks_unique/{cond}"] >= KS_LEVEL
        and abs(row[f"auc/{cond}"] - row["auc/retrain"]) <= AUC_MARGIN)
  return row


# (column, heading, format) of the page's table
COLUMNS = (("point", "point", "{}"), ("sources", "sources", "{}"),
           ("source_size", "articles/source", "{}"), ("passes", "passes", "{:.1f}"),
           ("k/P", "k/P", "{:.3f}"), ("G/I", "G/I", "{:.2f}"), ("d_model", "d", "{}"),
           ("tr_unique/sink-on", "TR sink-on", "{:.3f}"),
           ("tr_unique/sink-off/exclude", "TR sink-off", "{:.3f}"),
           ("tr_unique/backbone", "TR backbone", "{:.3f}"),
           ("tr_unique/retrain", "TR retrain", "{:.3f}"),
           ("ks_unique/sink-off/exclude", "KS p sink-off", "{:.3g}"),
           ("ks_unique/backbone", "KS p backbone", "{:.3g}"),
           ("auc/sink-on", "AUC sink-on", "{:.3f}"),
           ("auc/sink-off/exclude", "AUC sink-off", "{:.3f}"),
           ("auc/backbone", "AUC backbone", "{:.3f}"),
           ("auc/all-mlp-off", "AUC all-MLP-off", "{:.3f}"),
           ("auc/retrain", "AUC retrain", "{:.3f}"),
           ("nll_cost", "NLL vs dense", "{:+.1%}"),
           ("nll_vs_centre", "NLL vs centre NULL", "{:+.1%}"),
           ("capacity_lost", "sinks lost", "{:.3f}"),
           ("retrain_like/sink-off/exclude", "sink-off retrain-like", "{}"),
           ("retrain_like/backbone", "backbone retrain-like", "{}"))


def table(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in rows:
    lines.append("| " + " | ".join("-" if r[c] is None else f.format(r[c])
                                   for c, _, f in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def write_page(workdir: str, rows: list[dict]):
  """regimes.json, regimes.md (the table), regimes.png and index.md."""
  with open(os.path.join(workdir, "regimes.json"), "w") as f:
    json.dump(rows, f, indent=1)
  md = table(rows)
  with open(os.path.join(workdir, "regimes.md"), "w") as f:
    f.write(md)
  print(md)
  _plot(os.path.join(workdir, "regimes.png"), rows)
  legend = (f"Unique facts of the forget sources: mean log Truth Ratio (TR), KS forget "
            f"quality against the retrain (KS p), membership AUC ({MIA_SCORE}, forget vs "
            "never-seen documents; 0.5 = indistinguishable); held-out NLL of the NULL's "
            "deployed path vs the dense control, and vs the centre's NULL where both are "
            "measured on the same documents; sinks lost = mean share of a retained source's "
            "sinks zeroed by excluding as many sources as the forget set. Retrain-like: KS p "
            f">= {KS_LEVEL} and AUC within {AUC_MARGIN} of the retrain's.")
  with open(os.path.join(workdir, "index.md"), "w") as f:
    f.write(f"# sinkformer sweep: the regime map\n\n{legend}\n\n{md}\n![regimes](regimes.png)\n\n"
            + "".join(f"- {r['point']}: points/{slug(r['point'])}/eval/index.md\n" for r in rows))


def _plot(path: str, rows: list[dict]):
  plt = context.pyplot()
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  ax = axes[0]
  for cond, marker in (("sink-off/exclude", "o"), ("backbone", "s"), ("all-mlp-off", "^")):
    ax.plot(x, [r[f"auc/{cond}"] - r["auc/retrain"] for r in rows], marker, label=cond)
  ax.axhspan(-AUC_MARGIN, AUC_MARGIN, color="green", alpha=0.15, label="retrain-like")
  ax.set_ylabel(f"membership AUC - retrain's ({MIA_SCORE})")
  ax = axes[1]
  for cond, marker in (("sink-off/exclude", "o"), ("backbone", "s")):
    ax.semilogy(x, [max(r[f"ks_unique/{cond}"], 1e-12) for r in rows], marker, label=cond)
  ax.axhline(KS_LEVEL, color="green", label=f"p = {KS_LEVEL}")
  ax.set_ylabel("KS forget quality, unique facts")
  ax = axes[2]
  ax.bar(x, [100 * r["nll_cost"] for r in rows])
  ax.set_ylabel("held-out NLL vs dense control (%)")
  for ax in axes:
    ax.set_xticks(x, [r["point"] for r in rows], rotation=45, ha="right", fontsize=8)
    if ax is not axes[2]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
