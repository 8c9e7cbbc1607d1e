"""Toward the method's regime: the regime map along the number of sources, at the paper's ~7
passes and at ~1.5, with 200 forget and 400 never-seen sources where the corpus holds them
(a membership AUC's standard error ~0.03; 50 and 100 of 400); a second model seed at 6,400
x 1.5; and a source-private backbone (train.dp) at 400 and 6,400 sources, at 16 and 64 rows
a step, beside the same layout without it.

  sinkformer sweep --config experiments/scale.py --workdir runs/scale
  sinkformer sweep --config experiments/scale.py --workdir runs/scale --points "6400 x7"

The quickstart NULL and the centre of experiments/regimes.py, on generated encyclopedias of
400 to 20,000 people; every point trains the NULL, two retrain oracles (model seeds s and
s + 1: their gap is the noise floor) and two dense controls (total and active parameters).
Measured on 2 CPU cores, alone: ~16 minutes at 6,400 x 1.5 (the corpus and its tokenizer
included), ~24 with DP (its one-a-row dense controls included), ~50 at 6,400 x 7; about
10 at 1,600 x 1.5 and 5 at 400 x 1.5. 20,000 x 1.5 should take ~50 (not yet measured);
20,000 x 7 (~4 hours) is left out.
"""

from sinkformer.config import apply_presets, base

TOKENS = 132   # tokens one encyclopedia article takes in packed 128-token rows, measured


def point(label: str, articles: int, forget: int, holdout: int, passes: float,
          rows: int = 16, seed: int = 0) -> str:
  """A sweep point training (articles - holdout) sources for about `passes` epochs, `rows`
  rows a step, the models from `seed` (the retrains from seed and seed + 1)."""
  steps = max(20, round(passes * (articles - holdout) * TOKENS / (rows * 128)))
  return (f"{label}: sweep.articles={articles}, sweep.forget={forget}, "
          f"sweep.holdout={holdout}, train.steps={steps}, "
          f"train.warmup_steps={min(16, steps // 5)}, train.eval_every={steps}, "
          f"train.checkpoint_every={max(1, steps // 4)}"
          + (f", train.batch_size={rows}" if rows != 16 else "")
          + (f", seed={seed}" if seed else ""))


def private(label: str, articles: int, forget: int, holdout: int, passes: float,
            noise: float | None, clip: float = 8.0, rows: int = 16) -> str:
  """The point with one document a row, and (noise not None) a source-private backbone:
  rows clipped to `clip` (about the trained model's median row gradient norm), noise
  `noise` x clip. What DP-SGD costs follows noise / rows, the noise on the mean row."""
  dp = "" if noise is None else f", train.dp.clip={clip}, train.dp.noise={noise}"
  return (point(label, articles, forget, holdout, passes, rows)
          + ", data.max_docs_per_row=1" + dp)


POINTS = (
    point("400 x7", 400, 50, 100, 7), point("400 x1.5", 400, 50, 100, 1.5),
    private("400 x7 one a row", 400, 50, 100, 7, None),
    private("400 x7 dp noise 1", 400, 50, 100, 7, 1.0),
    private("400 x7 dp noise 4", 400, 50, 100, 7, 4.0),
    point("1600 x7", 1600, 200, 400, 7), point("1600 x1.5", 1600, 200, 400, 1.5),
    point("6400 x1.5", 6400, 200, 400, 1.5),
    private("6400 x1.5 dp noise 1", 6400, 200, 400, 1.5, 1.0),
    private("6400 x1.5 dp noise 4", 6400, 200, 400, 1.5, 4.0),
    # noise / rows 1/64, a quarter of the 16-row points' least: toward the paper's batch
    private("6400 x1.5 dp noise 1 rows 64", 6400, 200, 400, 1.5, 1.0, rows=64),
    private("6400 x1.5 one a row rows 64", 6400, 200, 400, 1.5, None, rows=64),
    point("6400 x1.5 seed 1", 6400, 200, 400, 1.5, seed=1),
    point("6400 x7", 6400, 200, 400, 7),
    point("20000 x1.5", 20000, 200, 400, 1.5),
)
PRESETS = {"small": {"sweep.points": POINTS[:4]}}


def get_config(arg=None):
  c = base()
  c.model.scan_layers = False   # 4 small layers: unrolled runs faster on a CPU
  c.train.log_every = 40
  c.sweep = dict(corpus="encyclopedia", articles=400, source_size=1, forget=50, holdout=100,
                 clozes=True, points=POINTS)
  return apply_presets(c, arg, PRESETS)
