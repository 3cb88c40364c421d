"""Router invariants: gates, losses and float32 routing."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hmoe.routing.losses import load_balancing_loss, router_z_loss, update_balancing_bias
from hmoe.routing.routers import Router, hierarchical_routing, top_k_routing


def test_gates_sum_to_one_and_experts_are_distinct():
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  route = top_k_routing(logits, top_k=3)
  chex.assert_shape(route.gates, (64, 3))
  chex.assert_trees_all_close(jnp.sum(route.gates, axis=-1), jnp.ones(64), atol=1e-6)
  assert bool(jnp.all(route.gates[:, 0] >= route.gates[:, 1]))
  sorted_index = jnp.sort(route.expert_index, axis=-1)
  assert bool(jnp.all(sorted_index[:, 1:] != sorted_index[:, :-1]))
  # The chosen experts are the most probable ones.
  np.testing.assert_array_equal(np.asarray(route.expert_index[:, 0]), np.asarray(jnp.argmax(logits, axis=-1)))


def test_balance_loss_is_one_under_uniform_routing():
  num_tokens, num_experts = 64, 8
  probs = jnp.full((num_tokens, num_experts), 1.0 / num_experts)
  # Round-robin assignment: every expert gets exactly the same number of token choices.
  expert_index = jnp.stack([jnp.arange(num_tokens) % num_experts, (jnp.arange(num_tokens) + 1) % num_experts], -1)
  chex.assert_trees_all_close(load_balancing_loss(probs, expert_index), 1.0, atol=1e-6)


def test_balance_loss_grows_with_collapse():
  num_tokens, num_experts = 64, 8
  probs = jax.nn.one_hot(jnp.zeros(num_tokens, jnp.int32), num_experts)
  expert_index = jnp.zeros((num_tokens, 1), jnp.int32)
  chex.assert_trees_all_close(load_balancing_loss(probs, expert_index), float(num_experts), atol=1e-5)


def test_z_loss_golden():
  logits = jnp.array([[0.0, 0.0], [1.0, -1.0]])
  expected = np.mean(np.log([2.0, np.e + np.exp(-1.0)]) ** 2)
  chex.assert_trees_all_close(router_z_loss(logits), expected, rtol=1e-6)


def test_router_is_float32_for_bf16_inputs_and_jitter_only_in_training():
  router = Router(num_experts=4, top_k=2, jitter=0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 8)).astype(jnp.bfloat16)
  params = nn.meta.unbox(router.init(jax.random.PRNGKey(1), x, train=False))
  route = router.apply(params, x, train=False)
  assert route.probs.dtype == jnp.float32 and route.gates.dtype == jnp.float32
  again = router.apply(params, x, train=False)
  chex.assert_trees_all_equal(route.expert_index, again.expert_index)
  jittered = [router.apply(params, x, train=True, rngs={"jitter": jax.random.PRNGKey(seed)}).probs for seed in (0, 1)]
  assert float(jnp.max(jnp.abs(jittered[0] - jittered[1]))) > 0


def test_top1_gate_is_the_raw_probability_so_the_router_learns_from_the_loss():
  logits = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
  route = top_k_routing(logits, top_k=1)
  chex.assert_trees_all_close(route.gates[:, 0], jnp.max(jax.nn.softmax(logits), axis=-1), atol=1e-6)
  # A loss on the gated output must reach the logits (a renormalised single gate would be constant 1).
  grad = jax.grad(lambda l: jnp.sum(top_k_routing(l, top_k=1).gates * jnp.arange(16.0)[:, None]))(logits)
  assert float(jnp.max(jnp.abs(grad))) > 1e-3


def test_single_hierarchical_choice_gate_is_the_joint_probability():
  logits_TxGxM = jax.random.normal(jax.random.PRNGKey(2), (16, 4, 3))
  route = hierarchical_routing(logits_TxGxM, top_k_clusters=1, top_k_experts=1)
  chosen = jnp.take_along_axis(route.expert_probs.reshape(16, -1), route.expert_index, axis=-1)
  chex.assert_trees_all_close(route.gates.reshape(16, 1), chosen, atol=1e-6)
  grad = jax.grad(lambda l: jnp.sum(hierarchical_routing(l, 1, 1).gates.reshape(16) * jnp.arange(16.0)))(logits_TxGxM)
  assert float(jnp.max(jnp.abs(grad))) > 1e-3


def test_detached_aux_losses_train_the_router_but_not_its_input():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))

  def aux_and_gate_grads(detach):
    router = Router(num_experts=4, top_k=2, detach_aux_input=detach)
    params = router.init(jax.random.PRNGKey(1), x, train=False)
    aux = lambda p, x: (lambda r: jnp.sum(r.balance_loss) + jnp.sum(r.z_loss))(router.apply(p, x, train=False))
    gate = lambda p, x: jnp.sum(router.apply(p, x, train=False).gates[..., 0] * jnp.sum(x, -1))
    return aux(params, x), jax.grad(aux, argnums=(0, 1))(params, x), jax.grad(gate, argnums=1)(params, x)

  loss, (kernel_grad, input_grad), gate_grad = aux_and_gate_grads(detach=False)
  loss_d, (kernel_grad_d, input_grad_d), gate_grad_d = aux_and_gate_grads(detach=True)
  chex.assert_trees_all_close(loss_d, loss, rtol=1e-6)  # Same forward values.
  chex.assert_trees_all_close(kernel_grad_d, kernel_grad, rtol=1e-5, atol=1e-7)  # Same router update.
  assert float(jnp.max(jnp.abs(input_grad))) > 1e-3
  chex.assert_trees_all_close(input_grad_d, jnp.zeros_like(x))  # No aux gradient into the trunk...
  chex.assert_trees_all_close(gate_grad_d, gate_grad, rtol=1e-6)  # ...but the gates' gradient still flows.


def test_selection_bias_changes_choices_not_gate_values_in_top_k_routing():
  logits = jax.random.normal(jax.random.PRNGKey(4), (64, 8))
  bias = jnp.zeros(8).at[5].set(10.0)
  route = top_k_routing(logits, 2, selection_bias_E=bias)
  unbiased = top_k_routing(logits, 2)
  # Expert 5 is always picked (first); the other pick is the token's most probable other expert.
  assert bool(jnp.all(route.expert_index[:, 0] == 5))
  masked = jnp.where(jnp.arange(8) == 5, -jnp.inf, logits)
  np.testing.assert_array_equal(np.asarray(route.expert_index[:, 1]), np.asarray(jnp.argmax(masked, axis=-1)))
  # Gates are the unbiased probabilities of the picked experts, renormalised over the two.
  picked = jnp.take_along_axis(unbiased.probs, route.expert_index, axis=-1)
  chex.assert_trees_all_close(route.gates, picked / jnp.sum(picked, axis=-1, keepdims=True), atol=1e-6)
  chex.assert_trees_all_close(route.probs, unbiased.probs)


def test_balancing_bias_steps_against_the_load_error():
  load = jnp.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
  bias = update_balancing_bias(jnp.zeros((2, 4)), load, rate=0.01)
  chex.assert_trees_all_close(bias, jnp.array([[-0.01, -0.01, 0.01, 0.01], [0.0, 0.0, 0.0, 0.0]]), atol=1e-7)


def test_balancing_bias_evens_out_a_skewed_router():
  # Fixed logits that send most tokens to the first experts; bias updates alone (no training) must spread the load.
  num_experts = 8
  logits = jax.random.normal(jax.random.PRNGKey(5), (2048, num_experts)) + jnp.linspace(2.0, 0.0, num_experts)[None, :]

  def load_of(bias):
    route = top_k_routing(logits, 2, selection_bias_E=bias)
    return jnp.mean(jax.nn.one_hot(route.expert_index, num_experts), axis=(0, 1))

  def step(bias, _):
    return update_balancing_bias(bias, load_of(bias), rate=1e-3), None

  final_bias, _ = jax.lax.scan(step, jnp.zeros(num_experts), None, length=300)
  cv = lambda load: float(jnp.std(load) / jnp.mean(load))
  assert cv(load_of(jnp.zeros(num_experts))) > 0.5
  assert cv(load_of(final_bias)) < 0.1
