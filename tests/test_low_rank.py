"""`hmoe.model.low_rank` products against a naive per-block loop: values, and gradients of both inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from hmoe.model.low_rank import narrow, widen


def _naive_widen(p_NxSxR, v_ExRxO, blocks_N):
  return np.stack([p_NxSxR[n] @ v_ExRxO[blocks_N[n]] for n in range(len(blocks_N))])


def test_widen_matches_a_per_block_loop_in_value_and_gradients():
  rng = np.random.default_rng(0)
  num_experts, rank, width = 4, 3, 5
  blocks = np.array([2, 0, 2, 2, 3], np.int32)  # Expert 2 owns three blocks, expert 1 none.
  p = rng.normal(size=(len(blocks), 6, rank)).astype(np.float32)
  v = rng.normal(size=(num_experts, rank, width)).astype(np.float32)
  cotangent = rng.normal(size=(len(blocks), 6, width)).astype(np.float32)

  out = jax.jit(widen)(jnp.asarray(p), jnp.asarray(v), jnp.asarray(blocks))
  chex.assert_shape(out, (len(blocks), 6, width))
  np.testing.assert_allclose(np.asarray(out), _naive_widen(p, v, blocks), rtol=1e-5, atol=1e-5)

  loss = lambda p, v: jnp.sum(widen(p, v, jnp.asarray(blocks)) * cotangent)
  d_p, d_v = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(p), jnp.asarray(v))
  expected_d_p = np.stack([cotangent[n] @ v[blocks[n]].T for n in range(len(blocks))])
  expected_d_v = np.zeros_like(v)
  for n, expert in enumerate(blocks):
    expected_d_v[expert] += p[n].T @ cotangent[n]
  np.testing.assert_allclose(np.asarray(d_p), expected_d_p, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d_v), expected_d_v, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(d_v[1]), 0.0)  # No block, no gradient.


def test_narrow_matches_a_per_block_loop_in_value_and_gradients():
  rng = np.random.default_rng(1)
  num_experts, width, rank = 4, 5, 3
  blocks = np.array([1, 1, 3, 0, 1], np.int32)  # Expert 1 owns three blocks, expert 2 none.
  rows = rng.normal(size=(len(blocks), 6, width)).astype(np.float32)
  u = rng.normal(size=(num_experts, width, rank)).astype(np.float32)
  cotangent = rng.normal(size=(len(blocks), 6, rank)).astype(np.float32)

  out = jax.jit(narrow)(jnp.asarray(rows), jnp.asarray(u), jnp.asarray(blocks))
  chex.assert_shape(out, (len(blocks), 6, rank))
  np.testing.assert_allclose(np.asarray(out), _naive_widen(rows, u, blocks), rtol=1e-5, atol=1e-5)

  loss = lambda rows, u: jnp.sum(narrow(rows, u, jnp.asarray(blocks)) * cotangent)
  d_rows, d_u = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(rows), jnp.asarray(u))
  expected_d_rows = np.stack([cotangent[n] @ u[blocks[n]].T for n in range(len(blocks))])
  expected_d_u = np.zeros_like(u)
  for n, expert in enumerate(blocks):
    expected_d_u[expert] += rows[n].T @ cotangent[n]
  chex.assert_shape(d_u, u.shape)
  np.testing.assert_allclose(np.asarray(d_rows), expected_d_rows, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d_u), expected_d_u, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(d_u[2]), 0.0)  # No block, no gradient.
