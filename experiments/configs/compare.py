"""Dense vs standard MoE vs hierarchical MoE on WikiText-2, everything but the FFN kind equal.

  python -m experiments.train --config=experiments/configs/compare.py:hmoe8x4 --workdir=runs/compare/hmoe8x4
  python -m experiments.compare --runs_dir=runs/compare   # docs/hierarchical_moe.md's table, after all variants

Trunk, data order, seed, steps and tokens are those of `small.py` except the schedule (500 steps = 1.02M tokens, so
the four variants fit in about an hour of 2 CPU cores). Variants:
  dense    SwiGLU FFN of width 1024 (the active width of every sparse variant: top-2 x 512).
  moe      standard MoE, E=32 experts of width 512, top-2.
  hmoe8x4  hierarchical MoE, E=32 as G=8 clusters x M=4, rank R=16, top-1 cluster, top-2 experts inside.
  hmoe4x8  the same as G=4 x M=8.
Extra variants (not in the main table by default):
  moe_shared     standard MoE with a shared expert: an always-on SwiGLU of width 512 plus top-2 of 32 routed experts
                 of width 256 (DeepSeekMoE-style), the same active width 1024.
  hmoe8x4_adopt  hmoe8x4 that adopts every regrouping (min_gain=-1), to measure the loss spike of real regroups.
All sparse variants use the same balance-loss weight (0.01), z-loss weight and capacity factor (1.25). The HMoE
variants regroup their experts every 100 steps.
"""

import ml_collections

from experiments.configs import small

VARIANTS = ("dense", "moe", "hmoe8x4", "hmoe4x8", "moe_shared", "hmoe8x4_adopt")


def get_config(variant: str = "hmoe8x4") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"compare config variant must be one of {VARIANTS}, got {variant!r}")
  kind = "hmoe" if variant.startswith("hmoe") else variant.split("_")[0]
  config = small.get_config("dense" if kind == "dense" else "moe")  # Trunk, data and optimizer of small.py.
  config.model.ffn_pattern = kind
  config.model.moe.num_experts = 32
  if kind == "hmoe":
    clusters, members = map(int, variant[len("hmoe"):].split("_")[0].split("x"))
    config.model.hmoe.update(
        num_experts=clusters * members, num_clusters=clusters, rank=16, top_k_clusters=1, top_k_experts=2,
        expert_ff=512, capacity_factor=1.25, balance_loss_weight=0.01, cluster_balance_loss_weight=0.01,
        z_loss_weight=1e-3, recluster_every=100, min_gain=-1.0 if variant.endswith("_adopt") else 0.01)
  if variant == "moe_shared":
    config.model.shared_expert_ff = 512
    config.model.moe.expert_ff = 256
  # The comparison was measured without small.py's fan-in lr scaling, which acts on `w_down` matrices only and would
  # speed up the standard MoE's experts but not HMoE's shared bases and residuals.
  config.train.update(num_steps=500, warmup_steps=50, log_every=10, fan_in_lr_base=0)
  return config
