"""Which sources taught the model this? Rank sources by how much their sinks explain a text.

A source's *gain* on a text is the mean NLL per token of the text under the backbone alone
minus its mean NLL under that source's sinks (source mode, the run's exclusions applied):
the loss that source's sinks remove. A NULL keeps source-specific facts in their source's
sinks, so a unique fact should be explained best by the one source that states it, and a
shared fact by the several that state it (or by none: the backbone already knows it).

Candidates: every active source when the catalog is small (`everyone_below`), else the
router's `top_m` nearest to the text, plus any named ones. Unlearned sources are never
candidates: they cannot be served, so they cannot be credited either.

`evaluate` measures the ranking where the truth is known (the generated encyclopedia's
facts.jsonl): how often a unique fact's own source ranks first / in the top 5, against
chance, and where a shared fact's top 5 land among the sources that state it.
"""

from __future__ import annotations

import numpy as np

from sinkformer.serve import generate, serving


def candidates(server: serving.Server, text: str, named=(), top_m: int = 64,
               everyone_below: int = 4096) -> np.ndarray:
  alive = server.alive()
  ids = server.router.ids[alive]
  if len(ids) > everyone_below:
    query = serving.Router.embed(server.setup, server.params, [server.encode(text)])
    scores = np.asarray(query @ np.asarray(server.router.vectors).T)[0]
    scores[~alive] = -np.inf
    ids = server.router.ids[np.argsort(-scores)[:top_m]]
  named = [server.board.active(ref, "credited")["id"] for ref in named]
  return np.unique(np.concatenate([ids, np.asarray(named, ids.dtype)])).astype(np.int32)


def gains(server: serving.Server, prompt: str, answer: str | None, ids: np.ndarray,
          batch_size: int = 64) -> tuple[np.ndarray, float]:
  """(gain per candidate source, backbone NLL per token) of `answer` after `prompt` (or of
  the whole of `prompt` when `answer` is None)."""
  s = server
  if answer is None:
    head, tail = [s.tokenizer.bos], s.tokenizer.encode(prompt)
  else:
    head, tail = s.encode(prompt), s.tokenizer.encode(answer)
  n = len(tail)
  ex = s.exclusion()
  backbone = -generate.score(s.setup, s.params, [head], [tail], [0], ex, "backbone")[0] / n
  own = -generate.score(s.setup, s.params, [head] * len(ids), [tail] * len(ids), ids, ex,
                        "source", batch_size) / n
  return backbone - own, float(backbone)


def attribute(server: serving.Server, text: str, answer: str | None = None, named=(),
              top: int = 10, **kw) -> dict:
  ids = candidates(server, text, named, **kw)
  got, backbone = gains(server, text, answer, ids)
  order = np.argsort(-got)
  ranked = []
  for r in order[:top]:
    row = server.board.catalog.get(f"id:{ids[r]}")
    ranked.append({"id": int(ids[r]), "key": row["key"], "title": row["title"],
                   "gain": float(got[r]), "nll": backbone - float(got[r])})
  return {"text": text, "answer": answer, "backbone_nll": backbone,
          "candidates": len(ids), "ranked": ranked}


def plot(result: dict, path: str):
  from sinkformer.eval.context import pyplot
  plt = pyplot()
  rows = result["ranked"][::-1]
  fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
  ax.barh([f"{r['title']} ({r['id']})" for r in rows], [r["gain"] for r in rows])
  ax.axvline(0, color="k", lw=0.5)
  ax.set_xlabel("NLL the source's sinks remove (nats/token)")
  ax.set_title(f"{result['candidates']} candidates; backbone NLL {result['backbone_nll']:.2f}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate(server: serving.Server, facts: list[dict], limit: int = 100, seed: int = 0) -> dict:
  """Where each fact's own source ranks among every active source (unique facts), and how
  much of the top 5 states the fact (shared facts), against chance; scoring the whole
  probe ("text": prompt and answer) and the answer alone after the prompt ("answer")."""
  rng = np.random.default_rng(seed)
  ids = server.router.ids[server.alive()].astype(np.int32)
  index = {int(i): n for n, i in enumerate(ids)}
  key_to_id = {}
  out = {}
  for category in ("unique", "shared"):
    pool = [f for f in facts if f["category"] == category]
    pool = [pool[i] for i in rng.permutation(len(pool))[:limit]]
    hits = {scored: {"top1": [], "top5": [], "top5_share": []} for scored in ("text", "answer")}
    chance1, chance5 = [], []
    for f in pool:
      stating = []
      for key in f["stated_in"]:
        if key not in key_to_id:
          row = server.board.catalog.get(f"key:{key}")
          key_to_id[key] = None if row is None else row["id"]
        if key_to_id[key] in index:
          stating.append(index[key_to_id[key]])
      if not stating:   # its sources were held out or unlearned
        continue
      for scored, (text, answer) in {"text": (f"{f['prompt']} {f['answer']}", None),
                                     "answer": (f["prompt"], f["answer"])}.items():
        best5 = np.argsort(-gains(server, text, answer, ids)[0])[:5]
        hits[scored]["top1"].append(best5[0] in stating)
        hits[scored]["top5"].append(bool(set(best5) & set(stating)))
        hits[scored]["top5_share"].append(len(set(best5) & set(stating)) / 5)
      chance1.append(len(stating) / len(ids))
      chance5.append(1 - np.prod([(len(ids) - len(stating) - j) / (len(ids) - j)
                                  for j in range(5)]))
    if chance1:
      out[category] = {"facts": len(chance1), "candidates": len(ids),
                       "chance_top1": float(np.mean(chance1)),
                       "chance_top5": float(np.mean(chance5)),
                       **{scored: {k: float(np.mean(v)) for k, v in got.items()}
                          for scored, got in hits.items()}}
  return out
