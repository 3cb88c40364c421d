"""Post-hoc path: convert a trained standard MoE into a hierarchical MoE.

Per MoE layer with experts `W_e` (gate, up, down) and router rows `r_e`, the steps of `hmoe.clustering.pipeline` (the
ones the in-training regroup runs):
1. features `z_e` = fused parameter sketch and the router row as the activation term. A trained MoE has no EMA
   activation centroids, but its router row is the direction of the hidden states the expert wins: `r_e . x` is its
   logit. Clustering by it also keeps stage-1 routing faithful, because the HMoE cluster logit is the mean of the
   members' logits (`hmoe.routing.routers.hierarchical_routing`): experts with similar rows lose little when averaged.
   A calibration pass can supply real centroids instead (`centroids_LxExD`).
2. balanced spherical k-means into G clusters of M experts, experts permuted into cluster-major order;
3. base = mean of the members' weights, factors = rank-R truncated SVD of `W_e - B_c`, router rows permuted with
   their experts.

Everything outside the MoE layers (attention, norms, embeddings, shared experts) is copied unchanged; the MoE's
balancing biases are permuted with their experts into the HMoE's `RoutingState`. The result is a fresh parameter tree
for `TransformerLM(hmoe_model_config(...))` plus that routing state, whose `clusters.expert_id` records where each
converted expert came from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hmoe.clustering import pipeline
from hmoe.config import HMoEConfig, ModelConfig, RoutedConfig, parse_ffn_pattern
from hmoe.model.layers import SWIGLU_MATRICES
from hmoe.routing.state import RoutingState, init_routing_state

# MoE fields with no HMoE meaning: converting a model that depends on them would change what it computes.
_NOT_CONVERTIBLE = {"dispatch": "sort"}


def hmoe_model_config(moe_model: ModelConfig, *, num_clusters: int, rank: int, top_k_clusters: int = 1,
                      **hmoe_overrides: Any) -> ModelConfig:
  """The HMoE twin of a MoE model config: same trunk and experts, every `moe` layer becomes `hmoe`.

  Every field the two kinds share (`hmoe.config.RoutedConfig`: experts, width, capacity, eval mode, loss weights,
  jitter, balancing-bias rate, routed scale) carries over, and top_k becomes the experts chosen per cluster. A MoE
  trained with the einsum dispatch is rejected (the HMoE layer has no such path). `hmoe_overrides` (e.g.
  `recluster_every=0`) replace fields of the result's `HMoEConfig`.
  """
  if moe_model.routed_kind != "moe":
    raise ValueError(f"need a model with standard MoE layers, got ffn_pattern={moe_model.ffn_pattern!r}")
  moe = moe_model.moe
  for name, supported in _NOT_CONVERTIBLE.items():
    if getattr(moe, name) != supported:
      raise ValueError(f"cannot convert a MoE with moe.{name}={getattr(moe, name)!r} to an HMoE (only {supported!r})")
  shared = {field.name: getattr(moe, field.name) for field in dataclasses.fields(RoutedConfig)}
  hmoe = dataclasses.replace(moe_model.hmoe, **shared, num_clusters=num_clusters, rank=rank,
                             top_k_clusters=top_k_clusters, top_k_experts=moe.top_k)
  hmoe = dataclasses.replace(hmoe, **hmoe_overrides) if hmoe_overrides else hmoe
  pattern = ",".join("hmoe" if kind == "moe" else kind for kind in parse_ffn_pattern(moe_model.ffn_pattern))
  converted = dataclasses.replace(moe_model, ffn_pattern=pattern, hmoe=hmoe)
  converted.validate()
  return converted


def convert_moe_layer(moe_params: dict[str, Any], config: HMoEConfig, key: jax.Array,
                      centroid_ExD: jax.Array | None = None) -> tuple[dict[str, Any], jax.Array]:
  """HMoE parameters of one converted MoE layer, and the permutation (new position -> original expert id).

  Args:
    moe_params: one `MoEFeedForward`'s params: `router/kernel` [D, E], `w_gate`/`w_up` [E, D, F], `w_down` [E, F, D].
    config: the target HMoE layer config.
    key: PRNG key of the k-means seeding.
    centroid_ExD: optional activation centroids; default: the router rows (see the module docstring).
  """
  router_DxE = moe_params["router"]["kernel"]
  weights = {name: moe_params[f"w_{name}"] for name in SWIGLU_MATRICES}
  activation = router_DxE.T if centroid_ExD is None else centroid_ExD
  features = pipeline.grouping_features(weights, activation, router_DxE.T, config)
  _, perm_E = pipeline.propose_grouping(features, config, key)
  router_DxGxM = router_DxE.reshape(router_DxE.shape[0], config.num_clusters, config.experts_per_cluster)
  return pipeline.regrouped_layer(weights, router_DxGxM, perm_E, config.num_clusters, config.rank), perm_E


def convert_moe_params(params: dict[str, Any], hmoe_config: ModelConfig, key: jax.Array,
                       routing_state: RoutingState | None = None, centroids_LxExD: jax.Array | None = None
                       ) -> tuple[dict[str, Any], RoutingState, dict[str, jax.Array]]:
  """Converts every MoE layer of a trained `TransformerLM`'s params (plain arrays, no axis boxes).

  Args:
    params: the MoE model's parameters.
    hmoe_config: the target model config (`hmoe_model_config`).
    key: PRNG key of the k-means seeding.
    routing_state: the MoE run's routing state; its balancing biases move with their experts. Required when the
      target config balances with biases (`bias_update_rate > 0`), rejected with biases the target does not use.
    centroids_LxExD: optional activation centroids per MoE layer (default: router rows).

  Returns (HMoE params, the HMoE `RoutingState` with `clusters.expert_id` = original expert of each position,
  per-layer `relative_error` [Lh] = |W - W_hat| / |W| over all three matrices, the SVD truncation error).
  """
  layer_names = [f"block_{i}" for i in hmoe_config.routed_layers]
  missing = [name for name in layer_names if "moe" not in params.get(name, {})]
  if missing:
    raise ValueError(f"params have no standard MoE layer at {missing}; was the checkpoint trained with this config?")
  bias = None if routing_state is None else routing_state.selection_bias
  if (bias is not None) != (hmoe_config.hmoe.bias_update_rate > 0):
    raise ValueError(f"the MoE run {'has' if bias is not None else 'has no'} balancing biases but the HMoE config has "
                     f"hmoe.bias_update_rate={hmoe_config.hmoe.bias_update_rate}: convert with the same rate")
  keys = jax.random.split(key, len(layer_names))
  new_params = dict(params)
  perms, errors = [], []
  for layer, name in enumerate(layer_names):
    moe_params = params[name]["moe"]
    centroid = None if centroids_LxExD is None else centroids_LxExD[layer]
    hmoe_params, perm_E = convert_moe_layer(moe_params, hmoe_config.hmoe, keys[layer], centroid)
    block = {key: value for key, value in params[name].items() if key != "moe"}
    new_params[name] = {**block, "hmoe": hmoe_params}
    reconstructed = pipeline.reconstruct_experts(hmoe_params)
    squared_error = sum(jnp.sum(jnp.square(reconstructed[m] - moe_params[f"w_{m}"][perm_E])) for m in SWIGLU_MATRICES)
    squared_norm = sum(jnp.sum(jnp.square(moe_params[f"w_{m}"])) for m in SWIGLU_MATRICES)
    errors.append(jnp.sqrt(squared_error / squared_norm))
    perms.append(perm_E)
  perm_LxE = jnp.stack(perms).astype(jnp.int32)
  state = init_routing_state(hmoe_config)
  state = state.replace(clusters=state.clusters.replace(expert_id=perm_LxE))
  if bias is not None:
    state = state.replace(selection_bias=jnp.take_along_axis(bias, perm_LxE, axis=1))
  return new_params, state, {"relative_error": jnp.stack(errors)}
