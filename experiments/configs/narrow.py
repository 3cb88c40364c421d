"""Capacity-limited WikiText-2 comparison: a narrow trunk (D=64) where extra expert parameters can pay off.

  python -m experiments.train --config=experiments/configs/narrow.py:dense --workdir=runs/narrow/dense_s0
  python -m experiments.train --config=experiments/configs/narrow.py:moe --workdir=runs/narrow/moe_s0
  python -m experiments.train --config=experiments/configs/narrow.py:hmoe --workdir=runs/narrow/hmoe_s0
  python -m experiments.summarize --runs='runs/narrow/*'     # add --config.train.seed=N (workdir ..._sN) for repeats

Why a second comparison next to `small.py`: an MoE buys parameters, not FLOPs, so it can only beat the dense model with
the same active parameters where the dense model is short of parameters. At D=256 (`small.py`, 4.2M non-embedding
parameters) on WikiText-2's 2.6M training tokens that is not the case: the two were level within seed noise up to
12M tokens on an H100 (docs/dense_vs_moe.md). Here the trunk is 4x narrower (0.26M non-embedding parameters), so
capacity, not data, limits the dense model, and 3000 steps x 16 x 128 = 6.1M tokens (2.4 epochs) fit in about an hour
of one CPU core.

Both variants keep everything of `small.py` (4 layers, rotary, tied embeddings, BPE vocabulary 8192, AdamW 3e-3 with
warmup 100 and cosine decay, data order and seed) except the widths:
  dense  SwiGLU FFN of width 256 (4 x D).
  moe    an always-on shared SwiGLU of width 128 plus top-2 of 32 routed experts of width 64 (DeepSeekMoE-style,
         dropless); active FFN width 128 + 2 x 64 = 256, as in `dense`; 8.6x the dense model's FFN parameters. No
         balance loss (z-loss 1e-3 kept): at D=256 the balance loss cost more than the balance bought
         (docs/dense_vs_moe.md).
  hmoe   the same shared expert plus the same 32 routed experts as G=4 clusters of M=8 (shared base per cluster,
         rank-4 residuals per expert), top-1 cluster then top-2 experts inside it, dropless, no balance losses:
         75% fewer routed-expert parameters than `moe`. Clusters are regrouped every 250 steps by the experts'
         centred router rows (`similarity_signal="router"`); `--config.model.hmoe.recluster_every=0` freezes them.
Fan-in lr scaling is anchored at the dense width (`fan_in_lr_base=256`), so it leaves the dense model unchanged and
scales the shared and routed experts' output projections by x2 and x4, the same ratios as in `small.py`.
"""

import ml_collections

from experiments.configs import small

VARIANTS = ("dense", "moe", "hmoe")


def get_config(variant: str = "moe") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"narrow config variant must be one of {VARIANTS}, got {variant!r}")
  config = small.get_config("dense" if variant == "dense" else "moe_shared")
  config.model.update(d_model=64, num_heads=4, d_ff=256)
  if variant != "dense":
    config.model.shared_expert_ff = 128
    config.model.moe.update(num_experts=32, expert_ff=64, balance_loss_weight=0.0)
  if variant == "hmoe":
    config.model.ffn_pattern = "hmoe"
    config.model.hmoe.update(
        num_experts=32, num_clusters=4, rank=4, top_k_clusters=1, top_k_experts=2, expert_ff=64, dropless=True,
        balance_loss_weight=0.0, cluster_balance_loss_weight=0.0, z_loss_weight=1e-3, recluster_every=250,
        similarity_signal="router")
  config.train.update(num_steps=3000, fan_in_lr_base=256, log_every=100, eval_every=1000, checkpoint_every=500)
  return config
