"""Hierarchical MoE: oracle against a per-token loop with reconstructed expert weights, and routing invariants."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.config import HMoEConfig
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.routing import dispatch
from hmoe.routing.routers import hierarchical_routing

_D, _F = 8, 16


def _kept_clusters(cluster_index_TxKc: np.ndarray, num_clusters: int, capacity: int) -> np.ndarray:
  """GShard priority: all first cluster choices in token order, then second choices."""
  used = np.zeros(num_clusters, int)
  kept = np.zeros(cluster_index_TxKc.shape, bool)
  for k in range(cluster_index_TxKc.shape[1]):
    for t in range(cluster_index_TxKc.shape[0]):
      c = cluster_index_TxKc[t, k]
      if used[c] < capacity:
        kept[t, k], used[c] = True, used[c] + 1
  return kept


def _reconstructed(p, name, cluster, member, cfg):
  """W_e = B_c + U_e V_e for one expert, from the cluster-major parameters."""
  return p[f"base_{name}"][cluster] + p[f"u_{name}"][cluster, member] @ p[f"v_{name}"][cluster, member]


def _decisions(params, x_GxTxD, cfg: HMoEConfig, capacity: int):
  """Concrete routing choices and kept masks per group (piecewise constant, so they carry no gradient)."""
  decisions = []
  for x_TxD in x_GxTxD:
    route = hierarchical_routing(jnp.einsum("td,dgm->tgm", x_TxD, params["params"]["router"]["kernel"]),
                                 cfg.top_k_clusters, cfg.top_k_experts)
    kept = _kept_clusters(np.asarray(route.cluster_index), cfg.num_clusters, capacity)
    decisions.append((np.asarray(route.cluster_index), np.asarray(route.member_index), kept))
  return decisions


def _oracle(params, x_GxTxD, cfg: HMoEConfig, decisions):
  """Loops over tokens, kept clusters and chosen experts, each with its reconstructed weights."""
  p = params["params"]
  outputs = []
  for x_TxD, (cluster_index, member_index, kept) in zip(x_GxTxD, decisions):
    gates = hierarchical_routing(jnp.einsum("td,dgm->tgm", x_TxD, p["router"]["kernel"]), cfg.top_k_clusters,
                                 cfg.top_k_experts).gates
    rows = []
    for t in range(x_TxD.shape[0]):
      y_D = jnp.zeros(_D)
      for kc in range(cfg.top_k_clusters):
        if not kept[t, kc]:
          continue
        c = int(cluster_index[t, kc])
        for ke in range(cfg.top_k_experts):
          m = int(member_index[t, kc, ke])
          w = {name: _reconstructed(p, name, c, m, cfg) for name in ("gate", "up", "down")}
          hidden = jax.nn.silu(x_TxD[t] @ w["gate"]) * (x_TxD[t] @ w["up"])
          y_D = y_D + gates[t, kc, ke] * (hidden @ w["down"])
      rows.append(y_D)
    outputs.append(jnp.stack(rows))
  return jnp.stack(outputs)


# capacity_factor None: evaluation mode, dropless (slots in per-cluster row blocks instead of capacity buffers).
@pytest.mark.parametrize("top_k_clusters, capacity_factor", [(1, 0.5), (2, 1.25), (1, None), (2, None)])
def test_layer_matches_per_token_loop_with_reconstructed_weights(top_k_clusters, capacity_factor):
  train = capacity_factor is not None
  cfg = HMoEConfig(num_experts=8, num_clusters=4, rank=3, top_k_clusters=top_k_clusters, top_k_experts=2,
                   expert_ff=_F, capacity_factor=capacity_factor or 1.0, block_size=4, num_groups=2)
  layer = HMoEFeedForward(cfg)
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(0), (2, 10, _D))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x_BxLxD, train=True))
  params["params"]["router"]["kernel"] = params["params"]["router"]["kernel"] * 100.0  # Decisive routing: no near-ties.
  num_tokens = 10
  capacity = dispatch.expert_capacity(num_tokens, 4, top_k_clusters, capacity_factor) if train else num_tokens

  decisions = _decisions(params, x_BxLxD.reshape(2, num_tokens, _D), cfg, capacity)
  dropped = sum(int((~kept).sum()) for _, _, kept in decisions)
  y_fast, stats = layer.apply(params, x_BxLxD, train=train)
  y_oracle = _oracle(params, x_BxLxD.reshape(2, num_tokens, _D), cfg, decisions)
  chex.assert_trees_all_close(y_fast.reshape(2, num_tokens, _D), y_oracle, atol=1e-5, rtol=1e-5)
  assert int(stats.num_dropped) == dropped
  if train and capacity_factor < 1:
    assert dropped > 0

  fast_loss = lambda params, x: jnp.sum(jnp.sin(layer.apply(params, x, train=train)[0]))
  oracle_loss = lambda params, x: jnp.sum(jnp.sin(_oracle(params, x.reshape(2, num_tokens, _D), cfg, decisions)))
  grads_fast = jax.jit(jax.grad(fast_loss, argnums=(0, 1)))(params, x_BxLxD)
  grads_oracle = jax.jit(jax.grad(oracle_loss, argnums=(0, 1)))(params, x_BxLxD)
  chex.assert_trees_all_close(grads_fast, grads_oracle, atol=1e-5, rtol=1e-4)


def test_eval_is_dropless_and_statistics_are_consistent():
  cfg = HMoEConfig(num_experts=8, num_clusters=2, rank=2, expert_ff=_F, capacity_factor=0.25, block_size=4)
  layer = HMoEFeedForward(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, _D))
  params = layer.init(jax.random.PRNGKey(1), x, train=True)
  _, train_stats = layer.apply(params, x, train=True)
  _, eval_stats = layer.apply(params, x, train=False)
  assert int(train_stats.num_dropped) > 0 and int(eval_stats.num_dropped) == 0
  chex.assert_trees_all_close(jnp.sum(eval_stats.expert_load), 1.0, atol=1e-6)
  chex.assert_trees_all_close(jnp.sum(eval_stats.expert_token_count), 16.0 * 2, atol=1e-6)
  # Cluster load is the expert load summed over each cluster's members (top-1 cluster).
  chex.assert_trees_all_close(eval_stats.cluster_load, eval_stats.expert_load.reshape(2, 4).sum(-1), atol=1e-6)


def test_hierarchical_gates_and_choices():
  logits = jax.random.normal(jax.random.PRNGKey(0), (32, 4, 3))
  route = hierarchical_routing(logits, top_k_clusters=2, top_k_experts=2)
  chex.assert_shape(route.gates, (32, 2, 2))
  chex.assert_trees_all_close(jnp.sum(route.gates, axis=(1, 2)), jnp.ones(32), atol=1e-6)
  # Cluster choice follows the centroid logit = mean of member logits.
  np.testing.assert_array_equal(np.asarray(route.cluster_index[:, 0]),
                                np.asarray(jnp.argmax(jnp.mean(logits, -1), -1)))
  assert bool(jnp.all(route.member_index[..., 0] != route.member_index[..., 1]))
  chex.assert_trees_all_close(jnp.sum(route.expert_probs, axis=(1, 2)), jnp.ones(32), atol=1e-6)
  # Top-1 of each chosen cluster is its most probable member.
  chosen_logits = jnp.take_along_axis(logits, route.cluster_index[..., None], axis=1)
  np.testing.assert_array_equal(np.asarray(route.member_index[..., 0]), np.asarray(jnp.argmax(chosen_logits, -1)))


def test_hierarchical_balance_losses_are_one_when_uniform():
  num_tokens, num_clusters, num_members = 64, 4, 2
  # Near-zero logits (uniform probabilities) whose tiny nudges spread choices round-robin over all 8 experts.
  expert = jnp.arange(num_tokens) % (num_clusters * num_members)
  logits = 1e-4 * jax.nn.one_hot(expert, num_clusters * num_members).reshape(num_tokens, num_clusters, num_members)
  route = hierarchical_routing(logits, 1, 1)
  np.testing.assert_array_equal(np.asarray(route.expert_index[:, 0]), np.asarray(expert))
  chex.assert_trees_all_close(route.cluster_balance_loss, 1.0, atol=1e-3)
  chex.assert_trees_all_close(route.balance_loss, 1.0, atol=1e-3)


def test_selection_bias_changes_choices_not_gate_values():
  logits = jax.random.normal(jax.random.PRNGKey(3), (64, 2, 4))
  bias = jnp.zeros((2, 4)).at[1, 3].set(10.0)
  route = hierarchical_routing(logits, 1, 1, selection_bias_GxM=bias)
  assert bool(jnp.all(route.cluster_index[:, 0] == 1)) and bool(jnp.all(route.member_index[:, 0, 0] == 3))
  unbiased = hierarchical_routing(logits, 1, 1)
  # A single choice is gated by its unbiased joint probability: the bias moved the choice, not the gate's value.
  chex.assert_trees_all_close(route.gates[:, 0, 0], unbiased.expert_probs[:, 1, 3], atol=1e-6)
  chex.assert_trees_all_close(route.expert_probs, unbiased.expert_probs)
