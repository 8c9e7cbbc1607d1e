"""The regime map: where does a NULL's sink-off forget like a retrain, and what closes the leak
outside the MLP?

  sinkformer sweep --config experiments/regimes.py --workdir runs/regimes

The centre is the quickstart model (4 layers, d 128, G 96 + P 416, k 16; 160 steps of 16 x 128
tokens) on a generated encyclopedia of 400 people (~7 passes), 20 forgotten, 40 never seen.
Each other point moves one axis: sources, passes, k/P, G/I, model size, real text (400
Wikipedia Vital Articles' lead sections, `sinkformer data fetch wiki-vital`), sources of 8
articles each (a "book": does k have to grow with it?); then the ways to keep
source-specific facts out of attention and embeddings (C1-C3: per-source attention heads, a
slower backbone, a more strongly decayed backbone). Every point trains a NULL and its retrain
oracle (the dense control is shared where it is the same model): on 2 CPU cores ~3.5 minutes
a point, ~6 with its own dense control, longer for 4x passes and d 256.

Presets: smoke = two points of a tiny model (tests); leak = the centre and the leak variants.
"""

from sinkformer.config import apply_presets, base

AXES = (
    "centre",
    "sources=100: sweep.articles=100",
    "sources=1600: sweep.articles=1600",
    "passes/4: train.steps=40, train.warmup_steps=4",
    "passes x4: train.steps=640",
    "k=4: sinks.k=4",
    "k=64: sinks.k=64",
    "G/I=6%: model.mlp_backbone=32, sinks.num=480",
    "G/I=50%: model.mlp_backbone=256, sinks.num=256",
    "d=256: model.d_model=256, model.head_dim=64, model.mlp_backbone=192, sinks.num=832",
    "wiki-vital: sweep.corpus=wiki-vital",
    "books of 8: sweep.source_size=8, sweep.forget=5, sweep.holdout=10",
    "books of 8 k=64: sweep.source_size=8, sweep.forget=5, sweep.holdout=10, sinks.k=64",
)
LEAK = (
    "C1 sink heads: sinks.attn_heads=2, sinks.attn_k=1",
    "C2 backbone lr/10: train.backbone_lr_scale=0.1",
    "C3 backbone decay*10: train.backbone_decay_scale=10.0",
    "C2 backbone lr/3: train.backbone_lr_scale=0.33",
    "C1+C2 heads + backbone lr/3: sinks.attn_heads=2, sinks.attn_k=1, "
    "train.backbone_lr_scale=0.33",
)
PRESETS = {
    "smoke": {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 2,
              "model.num_kv_heads": 1, "model.head_dim": 32, "model.mlp_backbone": 32,
              "sinks.num": 96, "sinks.k": 8, "train.batch_size": 8, "train.steps": 8,
              "train.warmup_steps": 2, "train.log_every": 4, "train.eval_every": 8,
              "train.eval_batches": 1, "train.checkpoint_every": 8, "sweep.articles": 40,
              "sweep.forget": 6, "sweep.holdout": 8, "sweep.clozes": False,
              "sweep.points": ("centre", "k=2: sinks.k=2")},
    "leak": {"sweep.points": ("centre",) + LEAK},
}


def get_config(arg=None):
  c = base()
  c.model.scan_layers = False   # 4 small layers: unrolled runs faster on a CPU
  c.sweep = dict(corpus="encyclopedia", articles=400, source_size=1, forget=20, holdout=40,
                 clozes=True, points=AXES + LEAK)
  return apply_presets(c, arg, PRESETS)
