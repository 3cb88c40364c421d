"""Post-hoc MoE -> HMoE conversion: exactness at full rank, permutation consistency, error vs rank, the experiment."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import convert_moe, moe_runs
from experiments.configs import tiny
from hmoe.clustering import convert, pipeline
from hmoe.config import from_config_dict
from hmoe.model.transformer import TransformerLM
from hmoe.routing.state import init_routing_state
from hmoe.testing import dummy_batch, init_params, tiny_config
from hmoe.train.loop import train_and_evaluate


def _trained_like_moe(num_experts=8, expert_ff=16):
  """A tiny MoE LM whose expert weights are perturbed away from their init (so experts are distinct and non-trivial)."""
  config = tiny_config(ffn_pattern="dense,moe", d_model=16, num_heads=2,
                       moe=dataclasses.replace(tiny_config().model.moe, num_experts=num_experts, expert_ff=expert_ff))
  model = TransformerLM(config.model)
  batch = dummy_batch(config)
  params = init_params(model, batch["inputs"], train=False)
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape) * jnp.std(p), params)
  return config, params, batch


def _logits(model_config, params, inputs):
  """Eval-mode logits, compiled (op by op an HMoE forward takes over 10 s on CPU)."""
  return jax.jit(lambda p, x: TransformerLM(model_config).apply({"params": p}, x, train=False)[0])(params, inputs)


def test_one_cluster_full_rank_conversion_reproduces_the_moe_exactly():
  # G = 1 (top-1 cluster = all experts) and R = F: stage 2 is the MoE's top-k over all experts, and the SVD is exact.
  config, params, batch = _trained_like_moe(num_experts=4, expert_ff=16)
  hmoe_model = convert.hmoe_model_config(config.model, num_clusters=1, rank=16)
  converted, _, info = convert.convert_moe_params(params, hmoe_model, jax.random.PRNGKey(0))
  moe_logits, hmoe_logits = (_logits(model_config, p, batch["inputs"])
                              for model_config, p in ((config.model, params), (hmoe_model, converted)))
  chex.assert_trees_all_close(hmoe_logits, moe_logits, atol=2e-4, rtol=2e-4)
  assert float(info["relative_error"][0]) < 1e-5


def test_converted_experts_are_the_original_experts_permuted_with_their_router_rows():
  config, params, _ = _trained_like_moe(num_experts=8, expert_ff=16)
  hmoe_model = convert.hmoe_model_config(config.model, num_clusters=4, rank=16)  # Full rank: exact reconstruction.
  converted, routing, _ = convert.convert_moe_params(params, hmoe_model, jax.random.PRNGKey(3))
  perm = np.asarray(routing.clusters.expert_id[0])
  assert sorted(perm.tolist()) == list(range(8))
  moe, hmoe = params["block_1"]["moe"], converted["block_1"]["hmoe"]
  weights = pipeline.reconstruct_experts(hmoe)
  for name in ("gate", "up", "down"):
    chex.assert_trees_all_close(weights[name], moe[f"w_{name}"][perm], atol=1e-5)
  chex.assert_trees_all_close(hmoe["router"]["kernel"].reshape(16, 8), moe["router"]["kernel"][:, perm])
  # Everything outside the MoE layer is untouched.
  chex.assert_trees_all_close(converted["block_0"], params["block_0"])
  chex.assert_trees_all_close(converted["embedding"], params["embedding"])


def test_conversion_error_falls_with_rank_and_stays_below_the_no_residual_error():
  config, params, _ = _trained_like_moe(num_experts=8, expert_ff=16)
  errors = []
  for rank in (1, 4, 8):
    hmoe_model = convert.hmoe_model_config(config.model, num_clusters=2, rank=rank)
    errors.append(float(convert.convert_moe_params(params, hmoe_model, jax.random.PRNGKey(0))[2]["relative_error"][0]))
  assert errors[0] > errors[1] > errors[2] > 0
  # Base only (no residuals): the error of replacing every expert by its cluster mean. Rank 1 must already beat it.
  moe = params["block_1"]["moe"]
  stacked = jnp.concatenate([moe[f"w_{m}"].reshape(8, -1) for m in ("gate", "up", "down")], axis=1)
  _, routing, _ = convert.convert_moe_params(
      params, convert.hmoe_model_config(config.model, num_clusters=2, rank=1), jax.random.PRNGKey(0))
  grouped = stacked[np.asarray(routing.clusters.expert_id[0])].reshape(2, 4, -1)
  base_only = jnp.linalg.norm(grouped - grouped.mean(axis=1, keepdims=True)) / jnp.linalg.norm(stacked)
  assert errors[0] < float(base_only)


def test_hmoe_model_config_keeps_the_trunk_and_rejects_models_without_moe_layers():
  config = tiny_config(ffn_pattern="dense,moe")
  converted = convert.hmoe_model_config(config.model, num_clusters=2, rank=4)
  assert converted.ffn_kinds == ("dense", "hmoe")
  assert converted.hmoe.num_experts == config.model.moe.num_experts
  assert converted.hmoe.top_k_experts == config.model.moe.top_k
  assert dataclasses.replace(converted, ffn_pattern=config.model.ffn_pattern, hmoe=config.model.hmoe) == config.model
  with pytest.raises(ValueError, match="standard MoE"):
    convert.hmoe_model_config(tiny_config(ffn_pattern="dense").model, num_clusters=2, rank=4)
  with pytest.raises(ValueError, match="num_clusters"):
    convert.hmoe_model_config(config.model, num_clusters=3, rank=4)


def test_hmoe_model_config_carries_every_shared_routed_field_and_rejects_what_it_cannot_convert():
  moe = dataclasses.replace(tiny_config().model.moe, router_jitter=0.1, bias_update_rate=0.02, routed_scale=1.5,
                            detach_aux_input=True, num_groups=2, balance_loss_weight=0.03)
  config = tiny_config(moe=moe)
  hmoe = convert.hmoe_model_config(config.model, num_clusters=2, rank=4).hmoe
  for name in ("router_jitter", "bias_update_rate", "routed_scale", "detach_aux_input", "num_groups",
               "balance_loss_weight", "capacity_factor", "eval_dropless", "expert_ff"):
    assert getattr(hmoe, name) == getattr(moe, name), name
  dropless = tiny_config(moe=dataclasses.replace(moe, dropless=True))
  assert convert.hmoe_model_config(dropless.model, num_clusters=2, rank=4).hmoe.dropless
  bad = tiny_config(moe=dataclasses.replace(moe, dispatch="einsum"))
  with pytest.raises(ValueError, match="moe.dispatch='einsum'"):
    convert.hmoe_model_config(bad.model, num_clusters=2, rank=4)


def test_biases_move_with_their_experts_and_must_match_the_target_config():
  config, params, _ = _trained_like_moe(num_experts=8, expert_ff=16)
  config = dataclasses.replace(config, model=dataclasses.replace(
      config.model, moe=dataclasses.replace(config.model.moe, bias_update_rate=0.01)))
  bias = jnp.arange(8.0)[None] * 0.1
  routing = init_routing_state(config.model).replace(selection_bias=bias)
  hmoe_model = convert.hmoe_model_config(config.model, num_clusters=4, rank=4)
  _, converted, _ = convert.convert_moe_params(params, hmoe_model, jax.random.PRNGKey(3), routing_state=routing)
  np.testing.assert_allclose(converted.selection_bias[0], bias[0][np.asarray(converted.clusters.expert_id[0])])
  with pytest.raises(ValueError, match="has balancing biases"):
    convert.convert_moe_params(params, dataclasses.replace(
        hmoe_model, hmoe=dataclasses.replace(hmoe_model.hmoe, bias_update_rate=0.0)), jax.random.PRNGKey(3),
        routing_state=routing)
  with pytest.raises(ValueError, match="has no balancing biases"):
    convert.convert_moe_params(params, hmoe_model, jax.random.PRNGKey(3))


def test_convert_experiment_evaluates_converts_and_finetunes_a_bias_balanced_moe_run(wikitext_dir, tmp_path,
                                                                                   monkeypatch):
  raw = tiny.get_config().to_dict()
  raw["data"]["data_dir"] = str(wikitext_dir)
  raw["model"]["moe"]["bias_update_rate"] = 0.05  # Balanced by selection biases: they must reach every evaluation.
  raw["train"].update(num_steps=4, eval_every=4, checkpoint_every=4)
  train_and_evaluate(from_config_dict(raw), tmp_path / "moe")
  evaluations = []
  real_evaluate_all = convert_moe.evaluate_all

  def recording_evaluate_all(config, params, routing_state, corpus):
    results = real_evaluate_all(config, params, routing_state, corpus)
    # Host copies: the fine-tune later donates the converted state's buffers.
    evaluations.append((config, jax.device_get(params), jax.device_get(routing_state), corpus, results))
    return results

  monkeypatch.setattr(convert_moe, "evaluate_all", recording_evaluate_all)
  summary = convert_moe.run(tmp_path / "moe", tmp_path / "hmoe", members=2, rank=4, finetune_steps=3,
                            finetune_lr=1e-3)
  (_, _, moe_routing, _, _), (hmoe_config, hmoe_params, hmoe_routing, corpus, converted) = evaluations
  # Both evaluations used the MoE run's biases: the MoE's as trained, the converted model's permuted with experts.
  assert float(jnp.max(jnp.abs(moe_routing.selection_bias))) > 0
  np.testing.assert_allclose(hmoe_routing.selection_bias,
                             np.take_along_axis(np.asarray(moe_routing.selection_bias),
                                                np.asarray(hmoe_routing.clusters.expert_id), axis=1))
  # ...and they matter: without them the converted model scores differently.
  unbiased = real_evaluate_all(hmoe_config, hmoe_params, hmoe_routing.replace(
      selection_bias=jnp.zeros_like(hmoe_routing.selection_bias)), corpus)
  assert unbiased["valid/loss"] != pytest.approx(converted["valid/loss"], rel=1e-6)
  assert summary["moe_step"] == 4
  for stage in ("moe", "converted", "finetuned"):
    assert np.isfinite(summary[stage]["valid/word_perplexity"]), stage
  assert summary["converted"]["params_total"] < summary["moe"]["params_total"]
  assert json.loads((tmp_path / "hmoe" / "summary.json").read_text()) == summary
  # The fine-tune continued the MoE run's step count (and data position) for exactly finetune_steps updates.
  rows = [json.loads(line) for line in (tmp_path / "hmoe" / "metrics.jsonl").read_text().splitlines()]
  assert max(row["step"] for row in rows) == 7


def test_upcycling_converts_an_early_checkpoint_exactly_at_full_rank_and_trains_on_from_its_step(wikitext_dir,
                                                                                                 tmp_path):
  raw = tiny.get_config().to_dict()
  raw["data"]["data_dir"] = str(wikitext_dir)
  raw["train"].update(num_steps=6, eval_every=6, checkpoint_every=3, keep_checkpoints=3)
  moe_config = from_config_dict(raw)
  train_and_evaluate(moe_config, tmp_path / "moe")
  # One cluster of all experts at full rank: the conversion is exact, so the upcycled model starts as the MoE.
  hmoe_model = convert.hmoe_model_config(moe_config.model, num_clusters=1, rank=32, recluster_every=0)
  hmoe_config = dataclasses.replace(moe_config, model=hmoe_model)
  summary = moe_runs.upcycle(tmp_path / "moe", 3, hmoe_config, tmp_path / "up")
  assert max(summary["relative_error_per_layer"]) < 1e-5
  np.testing.assert_allclose(summary["converted"]["valid/loss"], summary["moe"]["valid/loss"], rtol=1e-5)
  # The MoE at step 3 (an early checkpoint, not the newest) differs from the finished MoE run.
  final_moe = convert_moe.evaluate_all(moe_config, convert_moe.restore_moe_state(moe_config, tmp_path / "moe").params,
                                       init_routing_state(moe_config.model),
                                       convert_moe.load_corpus(moe_config.data, 512, tmp_path / "moe"))
  assert final_moe["valid/loss"] != pytest.approx(summary["moe"]["valid/loss"], rel=1e-6)
  assert summary["final"]["step"] == 6
  rows = [json.loads(line) for line in (tmp_path / "up" / "metrics.jsonl").read_text().splitlines()]
  assert min(row["step"] for row in rows if "train/loss" in row) == 4  # Steps 4..6: the schedule continues.
  with pytest.raises(ValueError, match="model fields"):
    moe_runs.upcycle(tmp_path / "moe", 3, dataclasses.replace(hmoe_config, model=dataclasses.replace(hmoe_model,
                                                                                             d_ff=96)), tmp_path / "x")
  # Only the training stream must match: another seq_len is refused by name (data_dir may differ: same files).
  with pytest.raises(ValueError, match=r"data fields \['seq_len'\]"):
    moe_runs.upcycle(tmp_path / "moe", 3, dataclasses.replace(
        hmoe_config, data=dataclasses.replace(hmoe_config.data, seq_len=16)), tmp_path / "x")
