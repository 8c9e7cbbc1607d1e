"""Quickstart: a small NULL on the built-in encyclopedia, a few minutes on a laptop CPU.

  sinkformer train --config experiments/quickstart.py --workdir runs/quickstart
  sinkformer train --config experiments/quickstart.py:dense --workdir runs/quickstart-dense
  sinkformer generate --run runs/quickstart --mode source:person-7 --prompt "Bolo Girsk lives_in"
  sinkformer unlearn --run runs/quickstart --reason "erasure request" person-7
  sinkformer generate --run runs/quickstart --mode route --prompt "Bolo Girsk lives_in"

Corpus: Wikipedia's Vital Articles once `sinkformer data fetch wiki-vital` has run, else the
built-in encyclopedia (the run says which).

Presets (comma-separated after ':'): dense = the standard-transformer control of equal size;
smoke = a few steps of a tiny model (tests); bf16 = bfloat16 compute with float32 params.
Geometry follows method.md section 5: G = 96 of I = 512 (~19%), k/P = 16/416 (~3.8%).
"""

import ml_collections

from sinkformer.config import apply_presets

PRESETS = {
    "dense": {"model.kind": "dense"},
    "smoke": {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 2,
              "model.num_kv_heads": 1, "model.head_dim": 32, "model.mlp_backbone": 32,
              "sinks.num": 96, "sinks.k": 8, "data.num_sources": 64, "data.val_sources": 16,
              "train.batch_size": 8, "train.steps": 6, "train.warmup_steps": 2,
              "train.log_every": 3, "train.eval_every": 6, "train.eval_batches": 1,
              "train.checkpoint_every": 3},
    "bf16": {"model.dtype": "bfloat16"},
}


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(kind="null", vocab_size=512, d_model=128, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=32, mlp_backbone=96, rope_base=1e4, norm_eps=1e-5,
                 tie_embeddings=False, dtype="float32")
  c.sinks = dict(num=416, k=16, selection="exact", per_layer=False, seed=0,
                 backbone_rescale=False, attn_heads=0, attn_k=0)
  c.data = dict(corpus="wiki-vital", fallback="builtin", dir="", source_by="document",
                reader="arrayrecord", tfds_dir="", tokenizer_hash="", holdout="", exclude="",
                val_sources=64, num_sources=400, facts_per_source=3, seed=0, seq_len=128,
                max_docs_per_row=8, workers=2)
  c.train = dict(steps=160, batch_size=16, grad_accum=1, lr=2e-3, min_lr_ratio=0.1,
                 warmup_steps=16, weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=1.0,
                 log_every=10, eval_every=40, eval_batches=4,   # 160 steps ~ 25 epochs
                 checkpoint_every=40, keep_checkpoints=3)
  # Serving: exclude = zero unlearned sources' units in every pass; route = only never pick
  # them. The router embeds each source's title+opening (or its title only).
  c.unlearn = dict(policy="exclude", router="title+opening", allow_reactivation=False)
  # Measuring forgetting (sinkformer eval): the relearning attack (the mask active while the
  # attacker fine-tunes), GCG extraction budgets (prompt lengths tried shortest first), and
  # the capability suite's sample sizes.
  c.eval = dict(relearn=dict(steps=10, lr=1e-3, mask="sink-off/exclude"),
                gcg=dict(targets=8, target_len=16, lengths=(2, 4, 8, 16), steps=20, top_k=32,
                         candidates=64, init="prefix"),
                capability=dict(clozes=400, documents=256, bootstrap=1000))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  return apply_presets(c, arg, PRESETS)
