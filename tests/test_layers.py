"""Layer values against independent numpy computations: RMSNorm, rotary positions, causal attention, SwiGLU FFN."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.model.layers import CausalSelfAttention, DenseFeedForward, RMSNorm, apply_rotary, flat_dot, swiglu


def _normal(seed, shape, scale=1.0):
  return scale * np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _rms_norm_np(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def _rotary_np(x_BxLxNxH, base):
  """Rotates each pair (x[i], x[i + H/2]) of position p by the angle p * base^(-2i/H)."""
  x = np.asarray(x_BxLxNxH, np.float64)
  length, head_dim = x.shape[1], x.shape[-1]
  half = head_dim // 2
  out = np.empty_like(x)
  for p in range(length):
    for i in range(half):
      angle = p * base ** (-2.0 * i / head_dim)
      first, second = x[:, p, :, i], x[:, p, :, i + half]
      out[:, p, :, i] = first * np.cos(angle) - second * np.sin(angle)
      out[:, p, :, i + half] = first * np.sin(angle) + second * np.cos(angle)
  return out


def _silu_np(x):
  return x / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------------------------


def test_rms_norm_values_with_a_non_trivial_scale():
  x = _normal(0, (2, 3, 16), scale=3.0)
  x[0, 0] *= 100.0  # Rows of very different magnitude: the statistics are per row.
  scale = _normal(1, (16,))
  eps = 1e-2  # Large enough to matter for the small rows below.
  x[1, 2] *= 1e-2
  out = RMSNorm(epsilon=eps).apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _rms_norm_np(x, scale, eps), rtol=1e-5, atol=1e-6)


def test_rms_norm_of_bfloat16_input_keeps_float32_statistics():
  # Wide rows of mixed magnitudes: a mean of squares accumulated in bfloat16 is off by ~1e-2 relative.
  x = jnp.asarray(_normal(2, (4, 512)) * np.linspace(0.1, 10.0, 512, dtype=np.float32), jnp.bfloat16)
  scale = _normal(3, (512,))
  expected = _rms_norm_np(np.asarray(x.astype(jnp.float32)), scale, 1e-6)  # Exact statistics of the bf16 values.
  variables = {"params": {"scale": jnp.asarray(scale)}}
  out32 = RMSNorm().apply(variables, x)  # bf16 input, float32 output.
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out32), expected, rtol=1e-5, atol=1e-5)
  out16 = RMSNorm(dtype=jnp.bfloat16).apply(variables, x)
  assert out16.dtype == jnp.bfloat16  # Only the final result is rounded: one bf16 ulp.
  np.testing.assert_allclose(np.asarray(out16.astype(jnp.float32)), expected, rtol=2**-8, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Rotary positions
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [10_000.0, 50.0])
def test_rotary_rotates_half_pairs_by_position_times_frequency(base):
  x = _normal(4, (2, 7, 3, 8))
  out = np.asarray(apply_rotary(jnp.asarray(x), base))
  np.testing.assert_allclose(out, _rotary_np(x, base), atol=1e-5)
  # Position 0 is the identity, and every rotation keeps norms.
  np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rotary_dot_products_depend_only_on_the_relative_position():
  length = 12
  q, k = _normal(5, (8,)), _normal(6, (8,))
  # The same query and key vector at every position.
  q_rot = np.asarray(apply_rotary(jnp.broadcast_to(jnp.asarray(q), (1, length, 1, 8)), 10.0))[0, :, 0]
  k_rot = np.asarray(apply_rotary(jnp.broadcast_to(jnp.asarray(k), (1, length, 1, 8)), 10.0))[0, :, 0]
  scores_LxL = q_rot @ k_rot.T
  for offset in range(-length + 1, length):
    diagonal = np.diagonal(scores_LxL, offset)
    np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-4, err_msg=f"m - n = {-offset}")
  # ... and they do vary with it, else the check above would be vacuous.
  assert np.ptp([np.diagonal(scores_LxL, offset)[0] for offset in range(-length + 1, length)]) > 0.5


def test_rotary_keeps_the_input_dtype_and_computes_in_float32():
  x = _normal(7, (1, 64, 1, 8))
  out = apply_rotary(jnp.asarray(x, jnp.bfloat16), 10_000.0)
  assert out.dtype == jnp.bfloat16
  # Angles up to 63 rad: computed in bf16 they would be off by a quarter radian.
  expected = _rotary_np(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), 10_000.0)
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, atol=3e-2)


# ----------------------------------------------------------------------------------------------------------------------
# Causal self-attention
# ----------------------------------------------------------------------------------------------------------------------


def _attention_np(x_BxLxD, w_qkv, w_out, base):
  x = np.asarray(x_BxLxD, np.float64)
  qkv = np.einsum("bld,dtnh->tblnh", x, np.asarray(w_qkv, np.float64))
  query, key, value = _rotary_np(qkv[0], base), _rotary_np(qkv[1], base), qkv[2]
  head_dim, length = query.shape[-1], query.shape[1]
  scores_BxNxLxL = np.einsum("bqnh,bknh->bnqk", query, key) / np.sqrt(head_dim)
  future = np.triu(np.ones((length, length), bool), k=1)
  scores_BxNxLxL = np.where(future, -np.inf, scores_BxNxLxL)
  weights = np.exp(scores_BxNxLxL - scores_BxNxLxL.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended_BxLxNxH = np.einsum("bnqk,bknh->bqnh", weights, value)
  return np.einsum("blnh,nhd->bld", attended_BxLxNxH, np.asarray(w_out, np.float64))


def test_causal_attention_matches_numpy_softmax_attention_with_its_own_params():
  x = jnp.asarray(_normal(8, (2, 6, 16)))
  module = CausalSelfAttention(num_heads=2, rope_base=100.0)
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x)["params"])
  # Scale up the query/key weights so the softmax is far from uniform and the mask and 1/sqrt(H) both matter.
  params = {**params, "w_qkv": params["w_qkv"].at[:, :2].multiply(3.0)}
  out = jax.jit(module.apply)({"params": params}, x)
  expected = _attention_np(x, params["w_qkv"], params["w_out"], 100.0)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
  # The first position attends only to itself: its output is its own value through w_out.
  value_BxNxH = np.einsum("bd,dnh->bnh", np.asarray(x[:, 0], np.float64), np.asarray(params["w_qkv"][:, 2]))
  np.testing.assert_allclose(np.asarray(out[:, 0]), np.einsum("bnh,nhd->bd", value_BxNxH, params["w_out"]),
                             rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------------------------------


def test_dense_feed_forward_matches_numpy_swiglu():
  x = jnp.asarray(_normal(9, (2, 5, 8)))
  module = DenseFeedForward(d_ff=12)
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(1), x)["params"])
  gate, up, down = (np.asarray(params[name], np.float64) for name in ("w_gate", "w_up", "w_down"))
  x64 = np.asarray(x, np.float64)
  expected = (_silu_np(x64 @ gate) * (x64 @ up)) @ down
  np.testing.assert_allclose(np.asarray(jax.jit(module.apply)({"params": params}, x)), expected, rtol=1e-5, atol=1e-5)


def test_swiglu_with_stacked_weights_applies_each_experts_own_weights_and_rejects_other_layouts():
  # [E, S, D] inputs against [E, D, F] weights, the layout of the routed experts.
  x = _normal(10, (3, 4, 6))
  gate, up, down = _normal(11, (3, 6, 5)), _normal(12, (3, 6, 5)), _normal(13, (3, 5, 6))
  out = swiglu(*(jnp.asarray(a) for a in (x, gate, up, down)))
  expected = np.stack([(_silu_np(x[e] @ gate[e]) * (x[e] @ up[e])) @ down[e] for e in range(3)])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"x \[N, S, D\]"):
    swiglu(jnp.asarray(x[None]), *(jnp.asarray(a) for a in (gate, up, down)))


@pytest.mark.parametrize("x_shape, w_shape, num_contracting", [((2, 3, 4), (4, 5), 1), ((2, 3, 4, 5), (4, 5, 6), 2),
                                                                ((3, 4), (4, 3, 2, 2), 1)])
def test_flat_dot_is_tensordot(x_shape, w_shape, num_contracting):
  x, w = _normal(20, x_shape), _normal(21, w_shape)
  out = flat_dot(jnp.asarray(x), jnp.asarray(w), num_contracting)
  chex.assert_shape(out, x_shape[:len(x_shape) - num_contracting] + w_shape[num_contracting:])
  np.testing.assert_allclose(np.asarray(out), np.tensordot(x, w, num_contracting), rtol=1e-5, atol=1e-5)
