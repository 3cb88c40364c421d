"""Hierarchical MoE against an independent numpy two-stage router and a per-token loop with W = B + U V."""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.config import HMoEConfig
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.routing.routers import hierarchical_routing
from hmoe.testing import assert_close, layer_outputs_and_grads, random_layer_params

_D, _F = 8, 16
_MATRICES = ("gate", "up", "down")


def _np_softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _np_logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(axis=-1)
  return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


def _np_silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def _np_top(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest scores on the last axis, best first; asserts the choice is decisive (no near-tie)."""
  order = np.argsort(-scores, axis=-1, kind="stable")
  if k < scores.shape[-1]:
    ranked = np.take_along_axis(scores, order, axis=-1)
    assert np.min(ranked[..., k - 1] - ranked[..., k]) > 1e-4, "near-tie: pick other inputs"
  return order[..., :k]


@dataclasses.dataclass
class _Route:
  cluster_index: np.ndarray  # [..., T, Kc]
  member_index: np.ndarray  # [..., T, Kc, Ke]
  gates: np.ndarray  # [..., T, Kc, Ke]
  cluster_probs: np.ndarray  # [..., T, G]
  conditional: np.ndarray  # [..., T, G, M] p(member | cluster)

  @property
  def joint(self) -> np.ndarray:
    return self.cluster_probs[..., None] * self.conditional

  @property
  def expert_index(self) -> np.ndarray:
    """Global cluster-major expert ids [..., T, Kc, Ke]."""
    return self.cluster_index[..., None] * self.conditional.shape[-1] + self.member_index


def _np_route(logits_TxGxM: np.ndarray, top_kc: int, top_ke: int, bias_GxM: np.ndarray | None = None) -> _Route:
  """Two-stage routing written out: cluster logit = mean member logit, softmax over clusters, top-Kc clusters by
  p(cluster) + mean member bias, conditional softmax inside each chosen cluster, top-Ke members by p(m | c) + bias,
  gate = p(c) p(m | c) renormalised over all Kc * Ke choices (the raw joint probability for a single choice)."""
  logits = np.asarray(logits_TxGxM, np.float64)
  bias = np.zeros(logits.shape[-2:]) if bias_GxM is None else np.asarray(bias_GxM, np.float64)
  cluster_probs = _np_softmax(logits.mean(axis=-1))
  conditional = _np_softmax(logits)
  cluster_index = _np_top(cluster_probs + bias.mean(axis=-1), top_kc)
  lead = cluster_index.shape[:-1]
  member_index = np.zeros((*lead, top_kc, top_ke), int)
  gates = np.zeros((*lead, top_kc, top_ke))
  for pos in np.ndindex(*lead):
    for kc in range(top_kc):
      c = cluster_index[pos][kc]
      members = _np_top(conditional[pos][c] + bias[c], top_ke)
      member_index[pos][kc] = members
      gates[pos][kc] = cluster_probs[pos][c] * conditional[pos][c][members]
  if top_kc * top_ke > 1:
    gates = gates / gates.sum(axis=(-2, -1), keepdims=True)
  return _Route(cluster_index, member_index, gates, cluster_probs, conditional)


def _np_kept(cluster_index_TxKc: np.ndarray, num_clusters: int, capacity: int | None) -> np.ndarray:
  """GShard priority per cluster: all first cluster choices in token order, then all second choices."""
  kept = np.zeros(cluster_index_TxKc.shape, bool)
  used = np.zeros(num_clusters, int)
  for kc in range(cluster_index_TxKc.shape[1]):
    for t in range(cluster_index_TxKc.shape[0]):
      c = cluster_index_TxKc[t, kc]
      if capacity is None or used[c] < capacity:
        kept[t, kc], used[c] = True, used[c] + 1
  return kept


def _capacity(cfg: HMoEConfig, num_tokens: int, train: bool) -> int | None:
  """Slots per cluster, written out: ceil(cf * T * Kc / G) clipped to [1, T]; None when the run is dropless."""
  if cfg.dropless or (not train and cfg.eval_dropless):
    return None
  factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
  return min(num_tokens, max(1, math.ceil(factor * num_tokens * cfg.top_k_clusters / cfg.num_clusters)))


def _np_forward(p, x_GxTxD: np.ndarray, route: _Route, kept: np.ndarray, routed_scale: float) -> np.ndarray:
  """Per token, per kept cluster, per chosen member: gate * SwiGLU with W = B_c + U_e V_e (float64 numpy)."""
  w = {k: np.asarray(v, np.float64) for k, v in p.items() if k != "router"}
  y = np.zeros_like(x_GxTxD)
  for g, t in np.ndindex(*x_GxTxD.shape[:2]):
    for kc, c in enumerate(route.cluster_index[g, t]):
      if not kept[g, t, kc]:
        continue
      for ke, m in enumerate(route.member_index[g, t, kc]):
        mat = {name: w[f"base_{name}"][c] + w[f"u_{name}"][c, m] @ w[f"v_{name}"][c, m] for name in _MATRICES}
        hidden = _np_silu(x_GxTxD[g, t] @ mat["gate"]) * (x_GxTxD[g, t] @ mat["up"])
        y[g, t] += route.gates[g, t, kc, ke] * (hidden @ mat["down"])
  return routed_scale * y


def _jnp_oracle(p, x_GxTxD, cluster_index, member_index, kept, routed_scale):
  """The oracle as a jnp function of (params, x) with the numpy decisions as constants (they are piecewise
  constant), for gradients. Gates are recomputed from the logits, as written in `_np_route`."""
  logits = jnp.einsum("gtd,dcm->gtcm", x_GxTxD, p["router"]["kernel"])
  cluster_probs = jax.nn.softmax(jnp.mean(logits, axis=-1), axis=-1)
  conditional = jax.nn.softmax(logits, axis=-1)
  chosen_cluster_probs = jnp.take_along_axis(cluster_probs, cluster_index, axis=-1)
  chosen_conditional = jnp.take_along_axis(conditional, cluster_index[..., None], axis=2)
  gates = chosen_cluster_probs[..., None] * jnp.take_along_axis(chosen_conditional, member_index, axis=-1)
  if member_index.shape[-1] * member_index.shape[-2] > 1:
    gates = gates / jnp.sum(gates, axis=(-2, -1), keepdims=True)
  w = {name: p[f"base_{name}"][cluster_index][:, :, :, None]
       + p[f"u_{name}"][cluster_index[..., None], member_index] @ p[f"v_{name}"][cluster_index[..., None], member_index]
       for name in _MATRICES}  # [G, T, Kc, Ke, I, O]
  hidden = jax.nn.silu(jnp.einsum("gtd,gtabdf->gtabf", x_GxTxD, w["gate"])) * jnp.einsum(
      "gtd,gtabdf->gtabf", x_GxTxD, w["up"])
  out = jnp.einsum("gtabf,gtabfd->gtabd", hidden, w["down"])
  return routed_scale * jnp.einsum("gtab,gtabd->gtd", gates * kept[..., None], out)


_oracle_loss = lambda p, x, *decisions: jnp.sum(jnp.sin(_jnp_oracle(p, x, *decisions)))
_oracle_grad = jax.jit(jax.grad(_oracle_loss, argnums=(0, 1)))


def _random_params(layer: nn.Module, x_BxLxD: jax.Array, cfg: HMoEConfig, seed: int) -> dict:
  """Random parameters: bases with fan-in std, U V residuals as large as the bases (experts of a cluster clearly
  differ), and a router kernel of std 1 so that routing is decisive and gates are far from uniform."""

  def stddev(name, shape):
    if name == "kernel":
      return 1.0
    return cfg.rank**-0.5 if name.startswith("v_") else shape[-2] ** -0.5

  return random_layer_params(layer, x_BxLxD, seed, stddev)


# (config overrides, train, selection bias). 16 tokens; 12 experts in 4 clusters of 3. Dropless cases set a tiny
# capacity_factor and the eval-capacity case a large one, so using the wrong factor (or any capacity) changes drops.
_CASES = {
    "train-capacity-kc2-ke2-g2-scaled": (dict(top_k_clusters=2, top_k_experts=2, capacity_factor=0.5, num_groups=2,
                                              routed_scale=1.5), True, False),
    "train-capacity-kc1-ke1-g1": (dict(top_k_clusters=1, top_k_experts=1, capacity_factor=0.5), True, False),
    "train-dropless-kc2-ke1-g1-bias": (dict(top_k_clusters=2, top_k_experts=1, dropless=True, capacity_factor=0.25),
                                       True, True),
    "eval-dropless-kc1-ke2-g2-bias": (dict(top_k_clusters=1, top_k_experts=2, capacity_factor=0.25, num_groups=2),
                                      False, True),
    "eval-capacity-kc2-ke2-g1": (dict(top_k_clusters=2, top_k_experts=2, capacity_factor=4.0, eval_dropless=False,
                                      eval_capacity_factor=0.5), False, False),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_layer_matches_numpy_router_and_reconstructed_weights(case):
  overrides, train, with_bias = _CASES[case]
  cfg = HMoEConfig(**{"num_experts": 12, "num_clusters": 4, "rank": 2, "expert_ff": _F, "block_size": 4,
                      **overrides})
  num_clusters, num_members = cfg.num_clusters, cfg.experts_per_cluster
  layer = HMoEFeedForward(cfg)
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(0), (2, 8, _D))
  params = _random_params(layer, x_BxLxD, cfg, seed=1)
  p = params["params"]
  bias = jnp.asarray(np.random.RandomState(2).normal(size=cfg.num_experts) * 0.3, jnp.float32) if with_bias else None
  bias_GxM = None if bias is None else np.asarray(bias).reshape(num_clusters, num_members)

  num_tokens = 16 // cfg.num_groups
  x_GxTxD = np.asarray(x_BxLxD, np.float64).reshape(cfg.num_groups, num_tokens, _D)
  logits = np.einsum("gtd,dcm->gtcm", x_GxTxD, np.asarray(p["router"]["kernel"], np.float64))
  route = _np_route(logits, cfg.top_k_clusters, cfg.top_k_experts, bias_GxM)
  if with_bias:  # The bias moves some choices (gate values are still the unbiased probabilities).
    unbiased = _np_route(logits, cfg.top_k_clusters, cfg.top_k_experts)
    assert np.any(unbiased.expert_index != route.expert_index)
  capacity = _capacity(cfg, num_tokens, train)
  kept = np.stack([_np_kept(index, num_clusters, capacity) for index in route.cluster_index])

  y, stats, grads = layer_outputs_and_grads(layer, params, x_BxLxD, train=train, selection_bias=bias)
  assert_close("output", np.asarray(y).reshape(x_GxTxD.shape), _np_forward(p, x_GxTxD, route, kept, cfg.routed_scale),
                1e-5, 1e-5)
  dropped = int((~kept).sum())
  assert int(stats.num_dropped) == dropped
  assert int(stats.num_assignments) == kept.size
  assert (dropped > 0) == (capacity is not None), (dropped, capacity)  # Capacity cases really drop.

  # Statistics against numpy: loads, activation-centroid sums and counts, losses (means over routing groups).
  one_hot = np.eye(cfg.num_experts)[route.expert_index.reshape(cfg.num_groups, num_tokens, -1)]  # [G, T, A, E]
  per_token = one_hot.sum(axis=2)  # Kept or not.
  assert_close("expert_load", stats.expert_load, one_hot.mean(axis=(0, 1, 2)), 1e-6, 1e-6)
  assert_close("expert_token_count", stats.expert_token_count, per_token.sum(axis=(0, 1)), 1e-6, 1e-6)
  assert_close("expert_token_sum", stats.expert_token_sum, np.einsum("gte,gtd->ed", per_token, x_GxTxD), 1e-5, 1e-5)
  cluster_one_hot = np.eye(num_clusters)[route.cluster_index]  # [G, T, Kc, G]
  assert_close("cluster_load", stats.cluster_load, cluster_one_hot.mean(axis=(0, 1, 2)), 1e-6, 1e-6)
  joint = route.joint.reshape(cfg.num_groups, num_tokens, -1)
  balance = cfg.num_experts * np.sum(one_hot.mean(axis=(1, 2)) * joint.mean(axis=1), axis=-1).mean()
  assert_close("balance_loss", stats.balance_loss, balance, 1e-5, 1e-5)
  cluster_balance = num_clusters * np.sum(cluster_one_hot.mean(axis=(1, 2)) * route.cluster_probs.mean(axis=1), -1)
  assert_close("cluster_balance_loss", stats.cluster_balance_loss, cluster_balance.mean(), 1e-5, 1e-5)
  assert_close("z_loss", stats.z_loss, np.mean(_np_logsumexp(logits.reshape(*logits.shape[:2], -1)) ** 2),
                1e-5, 1e-5)

  grads_oracle = _oracle_grad(p, jnp.asarray(x_GxTxD, jnp.float32), jnp.asarray(route.cluster_index, jnp.int32),
                              jnp.asarray(route.member_index, jnp.int32), jnp.asarray(kept, jnp.float32),
                              cfg.routed_scale)
  for name in p:
    if name != "router":
      assert_close(f"d/d {name}", grads[0]["params"][name], grads_oracle[0][name], 1e-5, 1e-4)
  assert_close("d/d router kernel", grads[0]["params"]["router"]["kernel"], grads_oracle[0]["router"]["kernel"],
                1e-5, 1e-4)
  assert_close("d/d x", np.asarray(grads[1]).reshape(x_GxTxD.shape), grads_oracle[1], 1e-5, 1e-4)


def _np_softmax_vjp(probs: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
  return probs * (cotangent - np.sum(probs * cotangent, axis=-1, keepdims=True))


@pytest.mark.parametrize("top_kc, top_ke, with_bias", [(1, 1, False), (2, 1, True), (2, 2, False)])
def test_hierarchical_routing_golden_against_numpy(top_kc, top_ke, with_bias):
  num_tokens, num_clusters, num_members = 10, 3, 3
  num_experts = num_clusters * num_members
  rng = np.random.RandomState(top_kc * 10 + top_ke)
  logits = (2.0 * rng.normal(size=(num_tokens, num_clusters, num_members))).astype(np.float32)
  bias = (0.3 * rng.normal(size=(num_clusters, num_members))).astype(np.float32) if with_bias else None
  expected = _np_route(logits, top_kc, top_ke, bias)
  fn = lambda l: hierarchical_routing(l, top_kc, top_ke, None if bias is None else jnp.asarray(bias))
  route = fn(jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(route.cluster_index), expected.cluster_index)
  np.testing.assert_array_equal(np.asarray(route.member_index), expected.member_index)
  # Gates value by value (for Kc = 2 a wrong pairing of cluster and member probabilities keeps the sum at 1).
  assert_close("gates", route.gates, expected.gates, 1e-6, 1e-5)
  assert_close("cluster_probs", route.cluster_probs, expected.cluster_probs, 1e-6, 1e-5)
  assert_close("expert_probs", route.expert_probs, expected.joint, 1e-6, 1e-5)
  np.testing.assert_array_equal(np.asarray(route.expert_index), expected.expert_index.reshape(num_tokens, -1))

  # Golden Switch losses with f != P (the loss over experts uses the joint probabilities and all Kc * Ke choices).
  f_expert = np.bincount(expected.expert_index.reshape(-1), minlength=num_experts) / expected.expert_index.size
  f_cluster = np.bincount(expected.cluster_index.reshape(-1), minlength=num_clusters) / expected.cluster_index.size
  p_expert = expected.joint.reshape(num_tokens, -1).mean(axis=0)
  p_cluster = expected.cluster_probs.mean(axis=0)
  assert np.max(np.abs(f_expert - p_expert)) > 0.02 and np.max(np.abs(f_cluster - p_cluster)) > 0.02
  assert_close("balance_loss", route.balance_loss, num_experts * np.sum(f_expert * p_expert), 1e-6, 1e-5)
  assert_close("cluster_balance_loss", route.cluster_balance_loss, num_clusters * np.sum(f_cluster * p_cluster),
                1e-6, 1e-5)
  assert_close("z_loss", route.z_loss, np.mean(_np_logsumexp(logits.reshape(num_tokens, -1).astype(np.float64)) ** 2),
                1e-6, 1e-5)

  # Gradients: d loss / d P = E f / T per token (f constant), pulled back through both softmaxes in numpy.
  # Cluster logit z_c = mean_m l_cm, so d/d l_cm gets d/d z_c / M.
  w_cluster = num_clusters * f_cluster / num_tokens
  dz = _np_softmax_vjp(expected.cluster_probs, np.broadcast_to(w_cluster, expected.cluster_probs.shape))
  expected_cluster_grad = np.repeat(dz[..., None] / num_members, num_members, axis=-1)
  w_joint = (num_experts * f_expert / num_tokens).reshape(num_clusters, num_members)[None]  # d loss / d joint.
  d_conditional = w_joint * expected.cluster_probs[..., None]
  d_cluster_probs = np.sum(w_joint * expected.conditional, axis=-1)
  dz = _np_softmax_vjp(expected.cluster_probs, d_cluster_probs)
  expected_balance_grad = (_np_softmax_vjp(expected.conditional, d_conditional)
                           + np.repeat(dz[..., None] / num_members, num_members, axis=-1))
  grad_balance = jax.grad(lambda l: fn(l).balance_loss)(jnp.asarray(logits))
  grad_cluster = jax.grad(lambda l: fn(l).cluster_balance_loss)(jnp.asarray(logits))
  assert_close("d balance_loss / d logits", grad_balance, expected_balance_grad, 1e-7, 1e-4)
  assert_close("d cluster_balance_loss / d logits", grad_cluster, expected_cluster_grad, 1e-7, 1e-4)


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
