"""Packed INT4 with per-group scales: bit-exact packing, the half-step error bound, dequantized matmuls, STE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.inference import quantize as qlib


@pytest.mark.parametrize("shape", [(2, 5), (3, 4, 7), (8, 1)])
def test_pack_unpack_round_trip_is_bit_exact_including_the_extremes(shape):
  rng = np.random.default_rng(0)
  q = rng.integers(-8, 8, size=shape).astype(np.int8)
  q[0, 0], q[-1, -1] = -8, 7
  packed = qlib.pack_int4(q)
  assert packed.dtype == jnp.uint8 and packed.shape == (*shape[:-2], shape[-2] // 2, shape[-1])
  np.testing.assert_array_equal(np.asarray(qlib.unpack_int4(packed)), q)
  # The documented layout: row 2i in the low nibble, row 2i + 1 in the high nibble, two's complement.
  wide = q.astype(np.int32)
  np.testing.assert_array_equal(np.asarray(packed)[..., 0, :], (wide[..., 0, :] & 0xF) | ((wide[..., 1, :] & 0xF) << 4))


def test_pack_rejects_an_odd_number_of_rows():
  with pytest.raises(ValueError, match="even number of rows"):
    qlib.pack_int4(np.zeros((3, 2), np.int8))


@pytest.mark.parametrize("in_dim, group_size, scale_dtype", [(64, 64, "float16"), (100, 32, "bfloat16"),
                                                             (7, 4, "float16")])
def test_error_is_at_most_half_a_scale_step_and_groups_follow_the_input_dim(in_dim, group_size, scale_dtype):
  w = jax.random.normal(jax.random.PRNGKey(0), (3, in_dim, 6)) * jnp.linspace(0.1, 3.0, 6)[None, None, :]
  tensor = qlib.quantize(w, group_size, scale_dtype)
  num_groups = -(-in_dim // group_size)
  assert tensor.scale.shape == (3, num_groups, 6) and tensor.scale.dtype == jnp.dtype(scale_dtype)
  assert tensor.packed.shape == (3, num_groups * group_size // 2, 6)
  restored = qlib.dequantize(tensor)
  assert restored.shape == w.shape
  step = np.repeat(np.asarray(tensor.scale, np.float32), group_size, axis=1)[:, :in_dim]
  error = np.abs(np.asarray(restored) - np.asarray(w))
  assert np.all(error <= step / 2 * (1 + 1e-6)), float(np.max(error / step))
  # Each scale is the group's max |w| / 7, rounded up to the 16-bit grid (never below it).
  groups = np.pad(np.asarray(w), ((0, 0), (0, num_groups * group_size - in_dim), (0, 0)))
  absmax = np.abs(groups.reshape(3, num_groups, group_size, 6)).max(axis=2) / 7
  stored = np.asarray(tensor.scale, np.float32)
  assert np.all(stored >= absmax) and np.all(stored <= absmax * (1 + 2 ** -7))
  # Bytes: half a byte per (padded) weight plus 2 per scale.
  assert tensor.nbytes == 3 * 6 * (num_groups * group_size // 2 + 2 * num_groups)


def test_an_all_zero_group_stays_exactly_zero():
  w = jnp.zeros((8, 3)).at[4:, 1].set(1.0)
  tensor = qlib.quantize(w, group_size=4)
  restored = np.asarray(qlib.dequantize(tensor))
  np.testing.assert_array_equal(np.asarray(tensor.scale)[0], 0.0)  # Group 0 of every column is all zeros.
  np.testing.assert_array_equal(restored[:4], 0.0)
  np.testing.assert_array_equal(restored[4:, [0, 2]], 0.0)
  np.testing.assert_allclose(restored[4:, 1], 1.0, rtol=2 ** -10)  # 7 * (1/7 rounded up in float16).


def test_dequantized_matmul_equals_the_reference_matmul_with_dequantized_weights():
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 96))
  w = jax.random.normal(jax.random.PRNGKey(2), (96, 16))
  tensor = qlib.quantize(w, group_size=32)
  fused = jax.jit(lambda x, t: x @ qlib.dequantize(t))(x, tensor)
  reference = np.asarray(x, np.float64) @ np.asarray(qlib.dequantize(tensor), np.float64)
  np.testing.assert_allclose(np.asarray(fused), reference, rtol=1e-5, atol=1e-5)


def test_fake_quantize_has_the_quantized_forward_and_the_straight_through_gradient():
  w = jax.random.normal(jax.random.PRNGKey(3), (16, 4))
  np.testing.assert_array_equal(np.asarray(qlib.fake_quantize(w, 8)),
                                np.asarray(qlib.dequantize(qlib.quantize(w, 8))))
  upstream = jax.random.normal(jax.random.PRNGKey(4), (16, 4))
  grad = jax.grad(lambda w: jnp.sum(qlib.fake_quantize(w, 8) * upstream))(w)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(upstream))  # Identity backward.


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="group_size=3"):
    qlib.quantize(jnp.ones((4, 4)), group_size=3)
  with pytest.raises(ValueError, match="scale_dtype='int8'"):
    qlib.quantize(jnp.ones((4, 4)), scale_dtype="int8")
