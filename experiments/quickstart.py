"""Quickstart: a small NULL on the built-in encyclopedia, a few minutes on a laptop CPU.

  sinkformer train --config experiments/quickstart.py --workdir runs/quickstart
  sinkformer train --config experiments/quickstart.py:dense --workdir runs/quickstart-dense
  sinkformer generate --run runs/quickstart --mode source:person-7 --prompt "Bolo Girsk lives_in"
  sinkformer unlearn --run runs/quickstart --reason "erasure request" person-7
  sinkformer generate --run runs/quickstart --mode route --prompt "Bolo Girsk lives_in"

Corpus: Wikipedia's Vital Articles once `sinkformer data fetch wiki-vital` has run, else the
built-in encyclopedia (the run says which). Everything else is the base config
(sinkformer/config.py): 4 layers, d 128, I = 512 = G 96 + P 416 (G ~19%, k/P = 16/416 ~3.8%),
160 steps of 16 x 128 tokens (~25 epochs of the built-in corpus).

Presets (comma-separated after ':'): dense = the standard-transformer control of equal size;
smoke = a few steps of a tiny model (tests); bf16 = bfloat16 compute with float32 params.
"""

from sinkformer.config import apply_presets, base

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
  c = base()
  c.data.update(corpus="wiki-vital", fallback="builtin")
  c.model.scan_layers = False   # 4 small layers: unrolled runs ~20% faster on a CPU (measured)
  return apply_presets(c, arg, PRESETS)
