"""Small WikiText-2 config for 2 CPU cores: dense vs MoE LMs with the same active parameters.

  python -m experiments.train --config=experiments/configs/small.py:moe --workdir=runs/small_moe
  python -m experiments.train --config=experiments/configs/small.py:dense --workdir=runs/small_dense
  python -m experiments.train --config=experiments/configs/small.py:moe_shared --workdir=runs/small_moe_shared

All variants share the trunk (4 layers, D=256, 4 heads, rotary, tied embeddings, BPE vocab 8192), the data order,
the seed and the number of training tokens. `moe` puts an 8-expert top-2 MoE (expert width 512) in every layer;
`dense` uses a SwiGLU FFN of width 1024 = 2 x 512, the same active parameters and FLOPs per token; `moe_shared`
(DeepSeekMoE-style) an always-on shared SwiGLU of width 512 plus top-2 of 16 routed experts of width 256.
All variants scale the learning rate of FFN output projections by 1024 / fan_in (`train.fan_in_lr_base`, muP for
Adam): a no-op for the dense FFN (width 1024, the width the learning rate was tuned at), x2 for width-512 and x4 for
width-256 experts, so a narrow expert moves its output as fast per step as the dense FFN does.
Measured results (time on 2 CPU cores, validation/test word-level perplexity) are in docs/dense_vs_moe.md.
"""

import ml_collections

from hmoe.config import base_config

VARIANTS = ("moe", "dense", "moe_shared")


def get_config(variant: str = "moe") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"small config variant must be one of {VARIANTS}, got {variant!r}")
  config = base_config()
  config.model.update(
      vocab_size=8192, d_model=256, num_layers=4, num_heads=4, d_ff=1024, max_len=128,
      ffn_pattern="dense" if variant == "dense" else "moe", tie_embeddings=True, dtype="float32",
      moe=dict(num_experts=8, top_k=2, expert_ff=512, capacity_factor=1.25, eval_capacity_factor=2.0, dropless=False,
               balance_loss_weight=0.01, z_loss_weight=1e-3, router_jitter=0.0, dispatch="sort"),
  )
  if variant == "moe_shared":
    # DeepSeekMoE-style: an always-on SwiGLU of width 512 plus top-2 of 16 routed experts of width 256, dropless.
    # Active FFN width 512 + 2 x 256 = 1024, as in the other two variants.
    config.model.shared_expert_ff = 512
    config.model.moe.update(num_experts=16, expert_ff=256, dropless=True)
  config.data.update(dataset="wikitext-2", seq_len=128, batch_size=16, eval_batch_size=32,
                     eval_splits=("valid", "test"))
  config.train.update(seed=0, num_steps=1000, learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1,
                      weight_decay=0.1, grad_clip_norm=1.0, fan_in_lr_base=1024, log_every=50, eval_every=500,
                      checkpoint_every=100, keep_checkpoints=2)
  return config
