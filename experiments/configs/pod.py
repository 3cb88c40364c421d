"""Pod-scale config: a 7.0B-parameter (0.58B active per token) MoE LM on WikiText-103 for a TPU/GPU slice.

  python -m experiments.train --config=experiments/configs/pod.py --workdir=gs://BUCKET/hmoe/pod_moe \
      --data_dir=/path/to/data
  python -m experiments.train --config=experiments/configs/pod.py:hmoe ...   # hierarchical twin, 2.1B parameters

Variants: `moe` (64 experts of width 2816, top-2, every other layer), `dense` (same trunk, dense FFNs) and `hmoe`
(the same 64 experts as 16 clusters x 4 with rank-64 residuals, top-1 cluster, top-2 experts, regrouping every 1000
steps; clusters are sharded over the expert axis, 2 per shard).

Needs WikiText-103 train (`python -m hmoe.data --download --dataset=wikitext-103 --data_dir=DIR`).
Sized for 64 accelerators: mesh (data=-1, expert=8, model=1), so 8 experts per expert shard and one routing group
per data-parallel batch row. Not yet run: no pod was available; `tests/test_sharding.py` checks its shapes and
shardings with `jax.eval_shape` on fake devices.
"""

import ml_collections

from hmoe.config import base_config

VARIANTS = ("moe", "dense", "hmoe")


def get_config(variant: str = "moe") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"pod config variant must be one of {VARIANTS}, got {variant!r}")
  config = base_config()
  config.model.update(
      vocab_size=32768, d_model=1024, num_layers=24, num_heads=16, d_ff=5632, max_len=1024,
      ffn_pattern={"moe": "dense,moe", "hmoe": "dense,hmoe", "dense": "dense"}[variant], tie_embeddings=False,
      dtype="bfloat16",
      moe=dict(num_experts=64, top_k=2, expert_ff=2816, capacity_factor=1.25, eval_capacity_factor=2.0,
               balance_loss_weight=0.01, z_loss_weight=1e-3, router_jitter=0.01, dispatch="sort", num_groups=256),
      hmoe=dict(num_experts=64, num_clusters=16, rank=64, top_k_clusters=1, top_k_experts=2, expert_ff=2816,
                capacity_factor=1.25, eval_capacity_factor=2.0, num_groups=256, balance_loss_weight=0.01,
                cluster_balance_loss_weight=0.01, z_loss_weight=1e-3, recluster_every=1000),
  )
  config.data.update(dataset="wikitext-103", seq_len=1024, batch_size=256, eval_batch_size=256,
                     eval_splits=("valid", "test"))
  config.train.update(seed=0, num_steps=50_000, learning_rate=1e-3, warmup_steps=2000, min_lr_ratio=0.1,
                      weight_decay=0.1, grad_clip_norm=1.0, log_every=100, eval_every=2000, checkpoint_every=1000,
                      keep_checkpoints=3, mesh_shape=(-1, 8, 1))
  return config
