"""Quick start: the narrow HMoE (or its dense / MoE twins) trained for 300 steps, a first perplexity in minutes.

  python -m experiments.train --config=experiments/configs/quickstart.py --workdir=runs/quickstart_hmoe
  python -m experiments.train --config=experiments/configs/quickstart.py:moe --workdir=runs/quickstart_moe

Variants: `hmoe` (the default), `moe`, `dense`: `narrow.py`'s models (D=64, 4 layers, BPE 8192; README "Longer
runs" for the full 3000-step versions) with 300 steps = 0.6M tokens, warmup 30, and the HMoE regrouped every 100
steps, so a regroup shows up in the log. The perplexity is far from converged (README lists the value to expect); it
shows the whole path works: tokenizer, training, regroups, checkpoints, full-split evaluation.
"""

import ml_collections

from experiments.configs import narrow

VARIANTS = ("hmoe", "moe", "dense")


def get_config(variant: str = "hmoe") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"quickstart config variant must be one of {VARIANTS}, got {variant!r}")
  config = narrow.get_config(variant)
  config.train.update(num_steps=300, warmup_steps=30, log_every=50, eval_every=300, checkpoint_every=100)
  if variant == "hmoe":
    config.model.hmoe.recluster_every = 100
  return config
