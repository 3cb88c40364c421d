"""Pod-scale config: a 7.0B-parameter (0.58B active per token) MoE LM on WikiText-103 for a TPU/GPU slice.

  python -m experiments.train --config=experiments/configs/pod.py --workdir=gs://BUCKET/hmoe/pod_moe \
      --data_dir=/path/to/data

Needs WikiText-103 train (`python -m hmoe.data --download --dataset=wikitext-103 --data_dir=DIR`).
Sized for 64 accelerators: mesh (data=-1, expert=8, model=1), so 8 experts per expert shard and one routing group
per data-parallel batch row. Not yet run: no pod was available; `tests/test_sharding.py` checks its shapes and
shardings with `jax.eval_shape` on fake devices.
"""

import ml_collections

from hmoe.config import base_config


def get_config(variant: str = "moe") -> ml_collections.ConfigDict:
  if variant not in ("moe", "dense"):
    raise ValueError(f"pod config variant must be 'moe' or 'dense', got {variant!r}")
  config = base_config()
  config.model.update(
      vocab_size=32768, d_model=1024, num_layers=24, num_heads=16, d_ff=5632, max_len=1024,
      ffn_pattern="dense,moe" if variant == "moe" else "dense", tie_embeddings=False, dtype="bfloat16",
      moe=dict(num_experts=64, top_k=2, expert_ff=2816, capacity_factor=1.25, eval_capacity_factor=2.0,
               balance_loss_weight=0.01, z_loss_weight=1e-3, router_jitter=0.01, dispatch="sort", num_groups=256),
  )
  config.data.update(dataset="wikitext-103", seq_len=1024, batch_size=256, eval_batch_size=256,
                     eval_splits=("valid", "test"))
  config.train.update(seed=0, num_steps=50_000, learning_rate=1e-3, warmup_steps=2000, min_lr_ratio=0.1,
                      weight_decay=0.1, grad_clip_norm=1.0, log_every=100, eval_every=2000, checkpoint_every=1000,
                      keep_checkpoints=3, mesh_shape=(-1, 8, 1))
  return config
