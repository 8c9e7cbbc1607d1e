"""The paper's 1B Wikipedia NULL, in its reference geometry.

  sinkformer train --config experiments/wiki_1b.py:h100x8 --workdir /shared/runs/wiki_1b
  sbatch --nodes=4 launch/slurm.sbatch experiments/wiki_1b.py:h100x8x4 /shared/runs/wiki_1b
  sinkformer plan --config experiments/wiki_1b.py:v5p_128x2     # sizes before renting

32 layers, d_model 960, 15 query / 5 KV heads of 128, I = 8192 = G 500 + P 7692, ~100 sinks
per source (k/P = 1.3%), vocab 49152, context 1024, untied embeddings, rope base 1e5, bf16
compute, AdamW lr 5e-4. ~1.0B parameters. Presets pick the mesh for the hardware;
`dense` trains the parameter-matched standard transformer.
"""

from sinkformer.config import apply_presets, base

# Meshes follow practice: parameters sharded within a node/slice (NVLink, ICI), data parallel
# across them (dcn_data: the data-centre network). Micro-batches (batch_size / grad_accum rows
# over the data*fsdp devices) of 4 rows per device with remat "dots": see `sinkformer plan`.
# train.sync "step": whole bf16 weights and f32 gradients fit every device (22 GiB of
# temporaries vs 14), and gathering once per step moves far less than per layer and
# micro-batch (plan, per device per step: h100x8 84.6 -> 5.6 GiB, h100x8x4 22.5 -> 6.1 of
# which 0.5 across nodes, v5p_128 10.6 -> 5.6).
PRESETS = {
    "dense": {"model.kind": "dense"},
    "h100x8": {"mesh.data": 1, "mesh.fsdp": 8, "train.grad_accum": 16,           # one 8-GPU node
               "train.sync": "step"},
    "h100x8x4": {"mesh.data": 1, "mesh.fsdp": 8, "mesh.dcn_data": 4,             # four nodes
                 "train.grad_accum": 4, "train.sync": "step"},
    "v5p_128": {"mesh.data": 1, "mesh.fsdp": 64, "train.grad_accum": 2,          # one slice, 64 chips
                "train.sync": "step"},
    "v5p_128x2": {"mesh.data": 1, "mesh.fsdp": 64, "mesh.dcn_data": 2,           # two slices
                  "train.grad_accum": 1, "train.sync": "step"},
}


def get_config(arg=None):
  c = base()
  c.model.update(vocab_size=49152, d_model=960, num_layers=32, num_heads=15, num_kv_heads=5,
                 head_dim=128, mlp_backbone=500, rope_base=1e5, dtype="bfloat16",
                 remat="dots")   # keep projections, recompute attention: ~1/4 the memory, +2% FLOPs
  c.sinks.update(num=7692, k=100)
  # English Wikipedia from TFDS (prepared with array_record into data.tfds_dir): one source
  # per article, tokenized once into DATA_DIR/prepared by the first run.
  c.data.update(corpus="tfds:wikipedia/20231101.en:train", val_sources=4096, num_sources=4096,
                seq_len=1024, max_docs_per_row=32, workers=8)
  c.train.update(steps=60000, batch_size=512, lr=5e-4, warmup_steps=2000, log_every=50,
                 eval_every=2000, eval_batches=16, checkpoint_every=1000, keep_checkpoints=5)
  # Measuring forgetting: budgets in the range the paper's attacks used.
  c.eval.relearn.update(steps=20, lr=1e-5)
  c.eval.gcg.update(targets=32, target_len=32, lengths=(4, 8, 16, 32), steps=250, top_k=256,
                    candidates=512, init="random")
  c.eval.capability.update(clozes=2000, documents=2048, bootstrap=2000)
  return apply_presets(c, arg, PRESETS)
