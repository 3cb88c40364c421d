"""GLUE fine-tuning recipe (`experiments/glue.py`): the same for every model, so dense, MoE and HMoE compare fairly.

  python -m experiments.glue --task=rte --init_from=runs/narrow/moe_s0 --workdir=runs/glue/moe_rte_s0
  python -m experiments.glue --task=rte --config.finetune.scratch_config=narrow.py:moe --workdir=runs/glue/scratch

Variants: `default` (this recipe), `mean` (mean pooling instead of the last token's state, the pooling ablation).
Recipe: AdamW at 1e-3 (10% warmup, cosine to 0), weight decay 0.01, batch 32, 3 epochs, dropout 0.1 in the trunk
and before the head, inputs cut to 128 tokens, auxiliary losses as pretrained, HMoE regrouping off. Every field is a
`--config.finetune.<field>` override (`hmoe.glue.config.FinetuneConfig` documents them).
"""

import dataclasses

import ml_collections

from hmoe.glue.config import FinetuneConfig

VARIANTS = ("default", "mean")


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"glue config variant must be one of {VARIANTS}, got {variant!r}")
  defaults = dataclasses.asdict(FinetuneConfig())
  # None-valued fields become typed placeholders, so `--config.finetune.balance_loss_weight=0.01` parses.
  placeholders = {"glue_dir": str, "balance_loss_weight": float, "z_loss_weight": float,
                  "cluster_balance_loss_weight": float}
  for name, kind in placeholders.items():
    defaults[name] = ml_collections.config_dict.placeholder(kind)
  config = ml_collections.ConfigDict({"finetune": defaults})
  if variant == "mean":
    config.finetune.pooling = "mean"
  return config
