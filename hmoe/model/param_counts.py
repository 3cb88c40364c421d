"""Parameter counts of a model's parameter tree: total, expert and active per token."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hmoe.config import ModelConfig
from hmoe.model.transformer import TransformerLM


def parameter_counts(params: Any, config: ModelConfig) -> dict[str, int]:
  """Total, expert and active-per-token parameter counts of a param tree, and bytes of total/expert at float32.

  Expert parameters are the routed layers' per-expert (or per-cluster) matrices, as named by the routed config's
  `active_fraction`: `w_*` of standard MoE layers, bases `base_*` and residual factors `u_*`/`v_*` of hierarchical
  ones. A token uses `active_fraction` of each: top_k / E of the standard experts; Kc / G of the bases and
  Kc * Ke / E of the factors. Routers, attention, norms, embeddings and the shared expert are always active.
  Works on abstract trees (`jax.eval_shape`) too.
  """
  total = expert = active_expert = 0
  routed = config.routed
  params = nn.meta.unbox(params)  # Boxed (logically partitioned) leaves would otherwise hide their names' last key.
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = int(np.prod(leaf.shape))
    total += size
    names = [getattr(key, "key", "") for key in path]
    fraction = routed.active_fraction(names[-1]) if routed is not None and config.routed_kind in names else None
    if fraction is not None:
      expert += size
      active_expert += int(size * fraction)
  return {"params_total": total, "params_expert": expert, "params_active": total - expert + active_expert,
          "bytes_total_f32": 4 * total, "bytes_expert_f32": 4 * expert}


def model_parameter_counts(config: ModelConfig) -> dict[str, int]:
  """`parameter_counts` of a `TransformerLM(config)`, from its abstract parameter tree (nothing is allocated)."""
  abstract = jax.eval_shape(lambda: TransformerLM(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  return parameter_counts(abstract["params"], config)
