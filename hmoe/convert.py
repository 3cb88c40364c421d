"""Post-hoc path: convert a trained standard MoE into a hierarchical MoE (SPEC part 2; issue "HMoE", post-hoc path).

Per MoE layer with experts `W_e` (gate, up, down) and router rows `r_e`:
1. features `z_e` = fused parameter sketch (the same fixed projection `hmoe.regroup` uses) and the router row as the
   activation term. A trained MoE has no EMA activation centroids, but its router row is the direction of the hidden
   states the expert wins: `r_e . x` is its logit. Clustering by it also keeps stage-1 routing faithful, because the
   HMoE cluster logit is the mean of the members' logits (`hmoe.routing.hierarchical_routing`): experts with similar
   rows lose little when averaged. A calibration pass can supply real centroids instead (`centroids_LxExD`).
2. balanced spherical k-means into G clusters of M experts, experts permuted into cluster-major order;
3. base = mean of the members' weights, factors = rank-R truncated SVD of `W_e - B_c` (`hmoe.regroup.regrouped_layer`,
   the very function the in-training regroup uses), router rows permuted with their experts.

Everything outside the MoE layers (attention, norms, embeddings) is copied unchanged. The result is a fresh parameter
tree for `TransformerLM(hmoe_model_config(...))` plus a `ClusterState` whose `expert_id` records where each converted
expert came from; fine-tune it with `hmoe.train.train_and_evaluate(..., initial_params=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hmoe import clustering, regroup
from hmoe.config import ModelConfig

_MATRICES = ("gate", "up", "down")


def hmoe_model_config(moe_model: ModelConfig, *, num_clusters: int, rank: int, top_k_clusters: int = 1,
                      **hmoe_overrides: Any) -> ModelConfig:
  """The HMoE twin of a MoE model config: same trunk and experts, every `moe` layer becomes `hmoe`.

  Expert count, width, top-k (as experts per cluster), capacity, eval mode and loss weights carry over; anything in
  `hmoe_overrides` (e.g. `recluster_every=0`) replaces the result's `HMoEConfig` fields.
  """
  if moe_model.sparse_kind != "moe":
    raise ValueError(f"need a model with standard MoE layers, got ffn_pattern={moe_model.ffn_pattern!r}")
  moe = moe_model.moe
  hmoe = dataclasses.replace(
      moe_model.hmoe, num_experts=moe.num_experts, num_clusters=num_clusters, rank=rank,
      top_k_clusters=top_k_clusters, top_k_experts=moe.top_k, expert_ff=moe.expert_ff,
      capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
      eval_dropless=moe.eval_dropless, num_groups=moe.num_groups, balance_loss_weight=moe.balance_loss_weight,
      z_loss_weight=moe.z_loss_weight, **hmoe_overrides)
  pattern = ",".join("hmoe" if kind.strip() == "moe" else kind.strip() for kind in moe_model.ffn_pattern.split(","))
  converted = dataclasses.replace(moe_model, ffn_pattern=pattern, hmoe=hmoe)
  converted.validate()
  return converted


def convert_moe_layer(moe_params: dict[str, Any], config: ModelConfig, key: jax.Array,
                      centroid_ExD: jax.Array | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
  """HMoE parameters of one converted MoE layer, and the permutation (new position -> original expert id).

  Args:
    moe_params: one `MoEFeedForward`'s params: `router/kernel` [D, E], `w_gate`/`w_up` [E, D, F], `w_down` [E, F, D].
    config: the target (HMoE) model config.
    key: PRNG key of the k-means seeding.
    centroid_ExD: optional activation centroids; default: the router rows (see the module docstring).
  """
  cfg = config.hmoe
  router_DxE = moe_params["router"]["kernel"]
  weights = {name: moe_params[f"w_{name}"] for name in _MATRICES}
  sketch = clustering.sketch_expert([weights[name] for name in _MATRICES],
                                    regroup.sketch_projections(weights, cfg.sketch_rows, cfg.sketch_cols))
  activation = router_DxE.T if centroid_ExD is None else centroid_ExD
  features = clustering.fused_features(sketch, activation, cfg.similarity_alpha)
  assignment = clustering.balanced_kmeans(features, cfg.num_clusters, key, cfg.kmeans_iters)
  perm_E = clustering.cluster_major_permutation(assignment, cfg.num_clusters)
  router_DxGxM = router_DxE.reshape(router_DxE.shape[0], cfg.num_clusters, cfg.experts_per_cluster)
  return regroup.regrouped_layer(weights, router_DxGxM, perm_E, cfg.num_clusters, cfg.rank), perm_E


def convert_moe_params(params: dict[str, Any], hmoe_config: ModelConfig, key: jax.Array,
                       centroids_LxExD: jax.Array | None = None
                       ) -> tuple[dict[str, Any], regroup.ClusterState, dict[str, jax.Array]]:
  """Converts every MoE layer of a trained `TransformerLM`'s params (plain arrays, no axis boxes).

  Returns (HMoE params, ClusterState with `expert_id` = original expert of each position, per-layer
  `relative_error` [Lh] = |W - W_hat| / |W| over all three matrices, the SVD truncation error of the conversion).
  """
  layer_names = regroup.hmoe_layer_names(hmoe_config)
  missing = [name for name in layer_names if "moe" not in params.get(name, {})]
  if missing:
    raise ValueError(f"params have no standard MoE layer at {missing}; was the checkpoint trained with this config?")
  keys = jax.random.split(key, len(layer_names))
  new_params = dict(params)
  perms, errors = [], []
  for layer, name in enumerate(layer_names):
    moe_params = params[name]["moe"]
    centroid = None if centroids_LxExD is None else centroids_LxExD[layer]
    hmoe_params, perm_E = convert_moe_layer(moe_params, hmoe_config, keys[layer], centroid)
    block = {key: value for key, value in params[name].items() if key != "moe"}
    new_params[name] = {**block, "hmoe": hmoe_params}
    reconstructed = regroup.reconstruct_experts(hmoe_params)
    squared_error = sum(jnp.sum(jnp.square(reconstructed[m] - moe_params[f"w_{m}"][perm_E])) for m in _MATRICES)
    squared_norm = sum(jnp.sum(jnp.square(moe_params[f"w_{m}"])) for m in _MATRICES)
    errors.append(jnp.sqrt(squared_error / squared_norm))
    perms.append(perm_E)
  cluster_state = regroup.init_cluster_state(hmoe_config).replace(expert_id=jnp.stack(perms).astype(jnp.int32))
  return new_params, cluster_state, {"relative_error": jnp.stack(errors)}
