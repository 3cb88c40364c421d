"""Tiny config for tests and smoke runs: a 2-layer model that trains for a few steps in seconds on CPU.

  python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/hmoe_tiny        # variant moe
  python -m experiments.train --config=experiments/configs/tiny.py:hmoe --workdir=/tmp/hmoe_tiny_h

Variants (second layer's FFN): `moe` (4 experts, top-2; the default), `dense`, `hmoe` (8 experts as 2 clusters x 4,
rank 4, top-1 cluster, top-2 experts, regrouping every 3 steps).
"""

import ml_collections

from hmoe.config import base_config

VARIANTS = ("moe", "dense", "hmoe")


def get_config(variant: str = "moe") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"tiny config variant must be one of {VARIANTS}, got {variant!r}")
  config = base_config()
  config.model.update(
      vocab_size=512, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32, ffn_pattern="dense,moe",
      tie_embeddings=True, dtype="float32",
      moe=dict(num_experts=4, top_k=2, expert_ff=32, capacity_factor=1.25, eval_capacity_factor=2.0),
  )
  if variant == "dense":
    config.model.ffn_pattern = "dense"
  elif variant == "hmoe":
    config.model.ffn_pattern = "dense,hmoe"
    config.model.hmoe.update(num_experts=8, num_clusters=2, rank=4, expert_ff=32, top_k_clusters=1, top_k_experts=2,
                             block_size=8, recluster_every=3)
  config.data.update(dataset="wikitext-2", seq_len=32, batch_size=8, eval_batch_size=8, eval_splits=("valid",))
  # One device: the loop tests stay fast and deterministic; tests/test_sharding.py covers multi-device steps.
  config.train.update(num_steps=6, learning_rate=3e-3, warmup_steps=2, log_every=2, eval_every=4, mesh_shape=(1, 1, 1),
                      checkpoint_every=3, keep_checkpoints=2)
  return config
