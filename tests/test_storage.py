"""Compressed storage: what each parameter is stored as, exact save/load, damaged exports, closeness to the float
model, and quantization-aware training's straight-through gradient."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.config import HMoEConfig, MoEConfig
from hmoe.inference import quantize as qlib, storage
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.model.transformer import TransformerLM
from hmoe.routing.state import init_routing_state
from hmoe.testing import init_params, tiny_config

_HMOE = HMoEConfig(num_experts=8, num_clusters=2, rank=4, expert_ff=32, block_size=8, bias_update_rate=0.01)


def _model(kind):
  if kind == "hmoe":
    config = tiny_config(ffn_pattern="dense,hmoe", hmoe=_HMOE)
  else:
    config = tiny_config(moe=MoEConfig(num_experts=4, top_k=2, expert_ff=32))
  model = TransformerLM(config.model)
  params = init_params(model, np.zeros((2, 8), np.int32), train=False)
  return config, model, params


def test_each_component_gets_its_format():
  config, _, params = _model("hmoe")
  stored = storage.compress(params, config.model, storage.StorageConfig(base_dtype="float16", group_size=16))
  layer = stored["block_1"]["hmoe"]
  assert isinstance(layer["u_gate"], qlib.QuantizedTensor) and layer["u_gate"].group_size == 16  # I = D = 32.
  assert layer["v_gate"].group_size == 4  # Rank 4: the group shrinks to the input dim instead of padding to 16.
  assert layer["base_down"].dtype == jnp.float16 and layer["router"]["kernel"].dtype == jnp.float32
  assert stored["block_0"]["ffn"]["w_up"].dtype == jnp.bfloat16 and stored["embedding"].dtype == jnp.bfloat16
  assert stored["final_norm"]["scale"].dtype == jnp.float32
  _, _, moe_params = _model("moe")
  moe_config = _model("moe")[0].model
  experts = storage.compress(moe_params, moe_config)["block_1"]["moe"]
  assert isinstance(experts["w_down"], qlib.QuantizedTensor)
  sixteen = storage.compress(moe_params, moe_config, storage.StorageConfig(expert_format="bfloat16"))
  assert sixteen["block_1"]["moe"]["w_down"].dtype == jnp.bfloat16
  # Bytes: INT4 is half a byte per (padded) weight plus two bytes per scale; 16-bit is two bytes per weight.
  counts = storage.bytes_by_component(storage.compress(moe_params, moe_config), moe_config)
  w = moe_params["block_1"]["moe"]["w_down"]  # [E, F, D] = [4, 32, 32], groups of 32 rows.
  per_down = w.size // 2 + 2 * (w.shape[0] * (w.shape[1] // 32) * w.shape[2])
  assert counts["expert"] == per_down + 2 * (w.size // 2 + 2 * w.shape[0] * 1 * 32)
  with pytest.raises(ValueError, match="trunk_dtype='int8'"):
    storage.compress(params, config.model, storage.StorageConfig(trunk_dtype="int8"))


def test_save_load_round_trip_is_exact_and_the_export_is_verified(tmp_path):
  config, _, params = _model("hmoe")
  routing = init_routing_state(config.model)
  routing = routing.replace(selection_bias=jnp.arange(8.0)[None] * 0.1,
                            clusters=routing.clusters.replace(expert_id=jnp.arange(8)[::-1][None]))
  stored = storage.compress(params, config.model)
  storage.save(tmp_path / "export", stored, routing, config, storage.StorageConfig(), step=7)
  loaded, loaded_routing, manifest = storage.load(tmp_path / "export")
  assert manifest["step"] == 7
  flat, flat_loaded = (jax.tree_util.tree_leaves_with_path(tree, is_leaf=storage._is_quantized)
                       for tree in (stored, loaded))
  assert [path for path, _ in flat] == [path for path, _ in flat_loaded]
  for (_, a), (_, b) in zip(flat, flat_loaded):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))  # Bit for bit.
  chex.assert_trees_all_equal(loaded_routing, routing)
  with pytest.raises(FileExistsError, match="exists"):
    storage.save(tmp_path / "export", stored, routing, config, storage.StorageConfig())

  arrays = tmp_path / "export" / "arrays.npz"
  raw = arrays.read_bytes()
  arrays.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="is damaged"):
    storage.load(tmp_path / "export")
  arrays.write_bytes(raw)
  with np.load(arrays) as npz:
    tampered = {name: npz[name].copy() for name in npz.files}
  first = sorted(tampered)[0]
  tampered[first].reshape(-1)[0] += 1
  np.savez(arrays, **tampered)
  with pytest.raises(ValueError, match=rf"fails its SHA-256 check for arrays \['{first}'\]"):
    storage.load(tmp_path / "export")
  with pytest.raises(FileNotFoundError, match="is not a compressed export"):
    storage.load(tmp_path)
  manifest_path = tmp_path / "export" / "manifest.json"
  manifest_path.write_text(manifest_path.read_text().replace('"format_version": 1', '"format_version": 99'))
  with pytest.raises(ValueError, match="has format 99, this hmoe reads 1"):
    storage.load(tmp_path / "export")


def test_compressed_logits_stay_close_to_the_float_model():
  # Tolerance: INT4 with absmax scales has an RMS weight error of step / sqrt(12) ~ 0.1 sigma for Gaussian groups of
  # 32 (absmax ~ 2.4 sigma, step = absmax / 7), i.e. ~10% relative noise on every routed-expert weight of this
  # random-init model (its HMoE factors and 16-bit bases fare better). Measured: mean |logit error| 6% (MoE) and
  # 2.6% (HMoE) of the logits' std, KL(float || compressed) 3e-3 and 6e-4 nats per token. The bounds leave ~2-3x
  # room; a wrong scale (absmax / 8 without clipping) or a swapped nibble order exceeds them many times over.
  for kind in ("moe", "hmoe"):
    config, model, params = _model(kind)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 16)).astype(np.int32)
    forward = jax.jit(lambda p, model=model: model.apply({"params": p}, tokens, train=False)[0])
    reference = forward(params)
    logits = forward(storage.materialize(storage.compress(params, config.model)))
    error = float(jnp.mean(jnp.abs(logits - reference))) / float(jnp.std(reference))
    log_p, log_q = jax.nn.log_softmax(reference), jax.nn.log_softmax(logits)
    kl = float(jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)))
    assert error < 0.15 and kl < 0.01, (kind, error, kl)


def test_quantization_aware_training_forward_is_quantized_and_gradient_straight_through():
  cfg = dataclasses.replace(_HMOE, qat_group_size=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 32))
  qat, plain = HMoEFeedForward(cfg), HMoEFeedForward(dataclasses.replace(cfg, qat_group_size=0))
  params = {"params": init_params(plain, x, seed=1, train=False)}
  quantized = jax.tree_util.tree_map_with_path(
      lambda path, p: qlib.fake_quantize(p, qlib.group_for(p.shape[-2], 8))
      if getattr(path[-1], "key", "")[:2] in ("u_", "v_") else p, params)
  forward = {module: jax.jit(lambda p, module=module: module.apply(p, x, train=False)[0]) for module in (qat, plain)}
  y_qat, y_quantized = forward[qat](params), forward[plain](quantized)
  np.testing.assert_allclose(y_qat, y_quantized, atol=1e-6)
  assert float(jnp.max(jnp.abs(y_qat - forward[plain](params)))) > 1e-4  # QAT changed the forward.
  # Straight-through: the QAT gradient w.r.t. the float factors is the plain gradient at the quantized factors.
  grad = {module: jax.jit(jax.grad(lambda p, module=module: jnp.sum(jnp.sin(forward[module](p)))))
          for module in (qat, plain)}
  grad_qat, grad_at_quantized = grad[qat](params), grad[plain](quantized)
  chex.assert_trees_all_close(grad_qat, grad_at_quantized, atol=1e-5, rtol=1e-4)
