"""Router invariants: gates, losses (golden values and gradients against numpy), jitter and float32 routing."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.routing.losses import load_balancing_loss, router_z_loss, update_balancing_bias
from hmoe.routing.routers import HierarchicalRouter, Router, hierarchical_routing, top_k_routing


def _np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _np_logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _np_fraction(index: np.ndarray, num: int) -> np.ndarray:
  """Fraction of all entries of `index` (token -> owner assignments) that name each owner."""
  return np.bincount(index.reshape(-1), minlength=num) / index.size


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


def test_balance_loss_golden_value_and_gradient_with_load_unlike_probability():
  # Hand-built case where the assignment fractions f differ from the mean probabilities P, so E * sum f^2,
  # E * sum P^2 and E * sum f * P all give different values (uniform or collapsed routing cannot tell them apart).
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]], np.float32)
  expert_index = np.array([[0, 1], [1, 0], [0, 2], [0, 1]], np.int32)
  num_tokens, num_experts = probs.shape
  f = _np_fraction(expert_index, num_experts)  # [4, 3, 1] / 8: normalised over all T * K assignments.
  p = probs.mean(axis=0)
  np.testing.assert_allclose(f, [0.5, 0.375, 0.125])
  expected = num_experts * np.sum(f * p)  # 1.03125; E sum f^2 = 1.21875, E sum P^2 = 1.0078125, f over T: 2.0625.
  loss = load_balancing_loss(jnp.asarray(probs), jnp.asarray(expert_index))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6, err_msg="Switch loss E * sum_i f_i P_i")
  # f is piecewise constant: d loss / d probs[t, i] = E f_i / T for every token (zero if P is stop_gradient-ed).
  grad = jax.grad(load_balancing_loss)(jnp.asarray(probs), jnp.asarray(expert_index))
  np.testing.assert_allclose(np.asarray(grad), np.broadcast_to(num_experts * f / num_tokens, probs.shape),
                             rtol=1e-6, atol=1e-7)


def test_top_k_routing_losses_golden_against_numpy():
  rng = np.random.RandomState(7)
  logits = (2.0 * rng.normal(size=(12, 5))).astype(np.float32)
  num_tokens, num_experts = logits.shape
  probs = _np_softmax(logits.astype(np.float64))
  expert_index = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
  f = _np_fraction(expert_index, num_experts)
  assert np.max(np.abs(f - probs.mean(0))) > 0.05  # Not a degenerate case.
  route = top_k_routing(jnp.asarray(logits), 2)
  np.testing.assert_array_equal(np.asarray(route.expert_index), expert_index)
  np.testing.assert_allclose(float(route.balance_loss), num_experts * np.sum(f * probs.mean(0)), rtol=1e-5)
  np.testing.assert_allclose(float(route.z_loss), np.mean(_np_logsumexp(logits.astype(np.float64)) ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits))),
                             np.mean(_np_logsumexp(logits.astype(np.float64)) ** 2), rtol=1e-5)
  # Balance-loss gradient through the softmax: w_i = E f_i / T per token, d/dlogit = p * (w - <w, p>).
  w = num_experts * f / num_tokens
  expected_grad = probs * (w[None, :] - np.sum(w[None, :] * probs, axis=-1, keepdims=True))
  grad = jax.grad(lambda l: top_k_routing(l, 2).balance_loss)(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-7)
  # z-loss gradient: 2 lse_t softmax(l_t) / T.
  lse = _np_logsumexp(logits.astype(np.float64))
  grad_z = jax.grad(lambda l: top_k_routing(l, 2).z_loss)(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad_z), 2.0 * lse[:, None] * probs / num_tokens, rtol=1e-4, atol=1e-7)


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



def _identity_router(jitter: float) -> tuple[Router, dict]:
  """A Router over E = D experts with the identity kernel: its logits are its (jittered) inputs."""
  router = Router(num_experts=8, top_k=1, jitter=jitter)
  return router, {"params": {"kernel": jnp.eye(8)}}


def _recovered_noise(probs_GxTxE: jax.Array) -> np.ndarray:
  """Noise on features 1..7 from the probabilities: feature 0 of x is 0 (logit 0), the others 1 (logit = noise)."""
  log_probs = np.log(np.asarray(probs_GxTxE, np.float64))
  return log_probs[..., 1:] - log_probs[..., :1]


def test_router_jitter_is_multiplicative_uniform_noise_keyed_by_the_jitter_rng():
  eps = 0.3
  router, params = _identity_router(eps)
  x = jnp.ones((2, 128, 8)).at[..., 0].set(0.0)
  apply = lambda train, key: router.apply(params, x, train=train, rngs={"jitter": key}).probs
  noise = _recovered_noise(apply(True, jax.random.PRNGKey(0)))  # 2 * 128 * 7 = 1792 samples of U(1 - eps, 1 + eps).
  assert noise.min() >= 1 - eps - 1e-5 and noise.max() <= 1 + eps + 1e-5, (noise.min(), noise.max())
  assert noise.min() < 1 - 0.95 * eps and noise.max() > 1 + 0.95 * eps, (noise.min(), noise.max())  # Full range.
  assert abs(noise.mean() - 1.0) < 0.02, noise.mean()  # Standard error ~0.004.
  np.testing.assert_allclose(noise.std(), eps / np.sqrt(3.0), rtol=0.08, err_msg="spread of U(1-eps, 1+eps)")
  # Independent per element, not one factor per token (that would only rescale the logits, a temperature).
  assert noise.std(axis=-1).mean() > 0.6 * eps / np.sqrt(3.0), noise.std(axis=-1).mean()
  # Same key, same noise; another key, other noise.
  np.testing.assert_array_equal(_recovered_noise(apply(True, jax.random.PRNGKey(0))), noise)
  assert np.max(np.abs(_recovered_noise(apply(True, jax.random.PRNGKey(1))) - noise)) > 0.1
  # No jitter in evaluation, even with a jitter rng: the logits are exactly the inputs.
  np.testing.assert_allclose(_recovered_noise(apply(False, jax.random.PRNGKey(0))), 1.0, atol=1e-6)
  no_jitter, _ = _identity_router(0.0)
  np.testing.assert_allclose(np.asarray(no_jitter.apply(params, x, train=True).probs),
                             _np_softmax(np.asarray(x, np.float64)), rtol=1e-5)


def test_hierarchical_router_jitter_only_in_training_and_keyed():
  router = HierarchicalRouter(num_clusters=2, experts_per_cluster=4, top_k_clusters=1, top_k_experts=2, jitter=0.3)
  x = jnp.ones((1, 32, 8)).at[..., 0].set(0.0)
  params = {"params": {"kernel": jnp.eye(8).reshape(8, 2, 4)}}
  apply = jax.jit(lambda train, key: router.apply(params, x, train=train, rngs={"jitter": key}).expert_probs,
                  static_argnums=0)
  expected_eval = np.asarray(hierarchical_routing(x[0].reshape(32, 2, 4), 1, 2).expert_probs)
  np.testing.assert_allclose(np.asarray(apply(False, jax.random.PRNGKey(0)))[0], expected_eval, rtol=1e-6)
  chex.assert_trees_all_equal(apply(True, jax.random.PRNGKey(0)), apply(True, jax.random.PRNGKey(0)))
  assert float(jnp.max(jnp.abs(apply(True, jax.random.PRNGKey(0)) - apply(True, jax.random.PRNGKey(1))))) > 1e-3
  assert float(jnp.max(jnp.abs(apply(True, jax.random.PRNGKey(0))[0] - expected_eval))) > 1e-3

def test_top1_gate_is_the_raw_probability_so_the_router_learns_from_the_loss():
  logits = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
  route = top_k_routing(logits, top_k=1)
  chex.assert_trees_all_close(route.gates[:, 0], jnp.max(jax.nn.softmax(logits), axis=-1), atol=1e-6)
  # A loss on the gated output must reach the logits (a renormalised single gate would be constant 1).
  grad = jax.jit(jax.grad(lambda l: jnp.sum(top_k_routing(l, top_k=1).gates * jnp.arange(16.0)[:, None])))(logits)
  assert float(jnp.max(jnp.abs(grad))) > 1e-3


def test_single_hierarchical_choice_gate_is_the_joint_probability():
  logits_TxGxM = jax.random.normal(jax.random.PRNGKey(2), (16, 4, 3))
  route = hierarchical_routing(logits_TxGxM, top_k_clusters=1, top_k_experts=1)
  chosen = jnp.take_along_axis(route.expert_probs.reshape(16, -1), route.expert_index, axis=-1)
  chex.assert_trees_all_close(route.gates.reshape(16, 1), chosen, atol=1e-6)
  grad = jax.jit(jax.grad(lambda l: jnp.sum(hierarchical_routing(l, 1, 1).gates.reshape(16) * jnp.arange(16.0))))(
      logits_TxGxM)
  assert float(jnp.max(jnp.abs(grad))) > 1e-3


_ROUTERS = {
    "moe": lambda detach: Router(num_experts=4, top_k=2, detach_aux_input=detach),
    "hmoe": lambda detach: HierarchicalRouter(num_clusters=3, experts_per_cluster=2, top_k_clusters=2,
                                              top_k_experts=1, detach_aux_input=detach),
}


@pytest.mark.parametrize("kind", list(_ROUTERS))
def test_detached_aux_losses_train_the_router_but_not_its_input(kind):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
  kernel_shape = (8, 4) if kind == "moe" else (8, 3, 2)
  params = {"params": {"kernel": jax.random.normal(jax.random.PRNGKey(1), kernel_shape) * 0.4}}

  @jax.jit
  def forward_and_grads(params, x):
    out = {}
    for detach in (False, True):
      router = _ROUTERS[kind](detach)
      route = router.apply(params, x, train=False)
      names = route.loss_fields
      # Each auxiliary loss on its own (rows of a Jacobian), so a loss left out of the detached set cannot hide
      # behind the others.
      losses = lambda p, x, router=router, names=names: jnp.stack(
          [jnp.sum(getattr(router.apply(p, x, train=False), name)) for name in names])
      jacobians = jax.jacrev(losses, argnums=(0, 1))(params, x)
      grads = {name: jax.tree.map(lambda j, i=i: j[i], jacobians) for i, name in enumerate(names)}
      gate = lambda p, x, router=router: jnp.sum(
          router.apply(p, x, train=False).gates.reshape(2, 16, -1)[..., 0] * jnp.sum(x, -1))
      out[detach] = (route, grads, jax.grad(gate, argnums=(0, 1))(params, x))
    return out

  results = forward_and_grads(params, x)
  out, grads, gate_grads = results[False]
  out_d, grads_d, gate_grads_d = results[True]
  chex.assert_trees_all_close(out_d, out, rtol=1e-6)  # Same forward values: decisions, gates and losses.
  assert set(grads) == ({"balance_loss", "z_loss"} | ({"cluster_balance_loss"} if kind == "hmoe" else set()))
  for name, (kernel_grad, input_grad) in grads.items():
    kernel_grad_d, input_grad_d = grads_d[name]
    assert float(jnp.max(jnp.abs(kernel_grad_d["params"]["kernel"]))) > 1e-4, name  # The loss trains the kernel...
    chex.assert_trees_all_close(kernel_grad_d, kernel_grad, rtol=1e-5, atol=1e-7)  # ...exactly as before,
    assert float(jnp.max(jnp.abs(input_grad))) > 1e-4, name
    np.testing.assert_array_equal(np.asarray(input_grad_d), 0.0, err_msg=f"{name} gradient reaches x")  # not x.
  chex.assert_trees_all_close(gate_grads_d, gate_grads, rtol=1e-6)  # The gates' gradient still flows into x.


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
