"""Load-balance statistics and parameter counts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.analysis import regroup_recovery
from hmoe.config import DataConfig, HMoEConfig
from hmoe.data.wikitext import SplitTokens
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import TransformerLM
from hmoe.routing.state import init_routing_state
from hmoe.testing import tiny_config
from hmoe.train import optimizer as optimizer_lib, state as state_lib, step as step_lib
from hmoe.train.evaluation import evaluate
from hmoe.train.metrics import MetricsWriter, load_balance, read_metrics


def test_load_balance_extremes():
  uniform = load_balance(np.full((2, 4), 0.25))
  np.testing.assert_allclose([uniform["load_cv"], uniform["load_max_over_mean"]], [0.0, 1.0], atol=1e-12)
  collapsed = load_balance(np.array([[1.0, 0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(collapsed["load_cv"], np.sqrt(3.0), rtol=1e-12)
  np.testing.assert_allclose(collapsed["load_max_over_mean"], 4.0, rtol=1e-12)


def test_parameter_counts_match_hand_count():
  config = tiny_config()
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  state = jax.eval_shape(functools.partial(state_lib.init_train_state, model, optimizer, config))
  counts = parameter_counts(state.params, config.model)
  d, v, f, e, expert_f = 32, 64, 64, 4, 32
  attention = d * 3 * d + d * d
  dense_block = attention + 3 * d * f + 2 * d
  moe_block = attention + 3 * e * d * expert_f + d * e + 2 * d
  assert counts["params_total"] == v * d + dense_block + moe_block + d
  assert counts["params_expert"] == 3 * e * d * expert_f
  assert counts["params_active"] == counts["params_total"] - counts["params_expert"] * (e - 2) // e


def test_parameter_counts_read_boxed_trees_like_plain_ones():
  config = tiny_config()
  model = TransformerLM(config.model)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32), train=False))["params"]
  counts = parameter_counts(boxed, config.model)  # Logically partitioned leaves, as from init_boxed_train_state.
  assert counts == parameter_counts(nn.meta.unbox(boxed), config.model) and counts["params_expert"] == 3 * 4 * 32 * 32


def test_hmoe_active_parameter_count_matches_hand_count():
  # G=2 clusters of M=4 experts with rank-4 residuals, Kc=1 cluster and Ke=2 experts per token, a shared expert.
  hmoe = HMoEConfig(num_experts=8, num_clusters=2, rank=4, top_k_clusters=1, top_k_experts=2, expert_ff=16)
  config = tiny_config(ffn_pattern="dense,hmoe", hmoe=hmoe, shared_expert_ff=8)
  model = TransformerLM(config.model)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]  # noqa: E731
  params = nn.meta.unbox(jax.eval_shape(init))
  counts = parameter_counts(params, config.model)
  d, v, f, e, g, r, kc, ke, shared_f, expert_f = 32, 64, 64, 8, 2, 4, 1, 2, 8, 16
  attention = d * 3 * d + d * d
  bases = 3 * g * d * expert_f  # base_gate, base_up [G, D, F], base_down [G, F, D].
  factors = 3 * e * r * (d + expert_f)  # Per expert and matrix: U [I, R] and V [R, O] with {I, O} = {D, F}.
  non_expert = (v * d + attention + 3 * d * f + 2 * d  # Embedding, dense block.
                + attention + d * e + 3 * d * shared_f + 2 * d  # HMoE block without its experts: router [D, G, M].
                + d)  # Final norm.
  assert counts["params_total"] == non_expert + bases + factors
  assert counts["params_expert"] == bases + factors
  # A token uses Kc of the G bases and Kc * Ke of the E residual factor pairs.
  assert counts["params_active"] == non_expert + bases * kc // g + factors * kc * ke // e


def test_evaluate_scores_every_split_token_once_and_sums_over_batches():
  config = tiny_config(ffn_pattern="dense", num_layers=1)
  model = TransformerLM(config.model)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model))
  routing_state = init_routing_state(config.model)
  tokens = np.random.default_rng(0).integers(1, 64, 37).astype(np.int32)
  split = SplitTokens(tokens=tokens, num_words=29, path="tiny")
  # 37 targets in windows of 8: 5 windows, in 3 padded batches of 2 or in one batch of 8.
  many = evaluate(eval_fn, params, routing_state, split, DataConfig(seq_len=8, eval_batch_size=2), eos_id=0)
  single = evaluate(eval_fn, params, routing_state, split, DataConfig(seq_len=8, eval_batch_size=8), eos_id=0)
  assert many["num_tokens"] == single["num_tokens"] == len(tokens)
  assert many["num_words"] == 29
  np.testing.assert_allclose(many["loss"], single["loss"], rtol=1e-5)
  # Independently of the batching code: the stream after one eos of context, cut into windows by hand.
  inputs = np.zeros((8, 8), np.int32)
  targets = np.zeros((8, 8), np.int32)
  weights = np.zeros((8, 8), np.float32)
  inputs.reshape(-1)[1:37] = tokens[:-1]
  targets.reshape(-1)[:37] = tokens
  weights.reshape(-1)[:37] = 1.0
  by_hand = eval_fn(params, routing_state, {"inputs": inputs, "targets": targets, "weights": weights})
  np.testing.assert_allclose(many["loss"] * 37, float(by_hand["nll_sum"]), rtol=1e-5)
  np.testing.assert_allclose(many["word_perplexity"], np.exp(float(by_hand["nll_sum"]) / 29), rtol=1e-5)
  np.testing.assert_allclose(many["token_perplexity"], np.exp(many["loss"]), rtol=1e-5)


def test_metrics_writer_appends_json_lines(tmp_path):
  writer = MetricsWriter(tmp_path / "m.jsonl")
  writer.write(1, {"loss": np.float32(2.5), "load": np.array([0.5, 0.5])})
  MetricsWriter(tmp_path / "m.jsonl").write(2, {"loss": 2.0})  # Reopened, as after a resume.
  assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1, "loss": 2.5, "load": [0.5, 0.5]},
                                                 {"step": 2, "loss": 2.0}]


def _read_tensorboard_scalars(directory):
  """{tag: [(step, value)]} from every TFRecord event file under `directory` (length, crc, event proto, crc)."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_metrics_writer_also_writes_finite_scalars_as_tensorboard_events(tmp_path):
  writer = MetricsWriter(tmp_path / "m.jsonl")
  writer.write(1, {"train/loss": np.float32(2.5), "train/expert_load": np.array([0.5, 0.5]), "eval/ok": True})
  writer.write(3, {"train/loss": 2.0, "train/tokens_per_second": float("nan")})
  writer.close()
  scalars = _read_tensorboard_scalars(tmp_path / "tensorboard")
  assert set(scalars) == {"train/loss"}  # Arrays, booleans and NaN stay in metrics.jsonl only.
  assert [step for step, _ in scalars["train/loss"]] == [1, 3]
  np.testing.assert_allclose([value for _, value in scalars["train/loss"]], [2.5, 2.0])
  MetricsWriter(tmp_path / "off" / "m.jsonl", tensorboard=False).write(1, {"train/loss": 1.0})
  assert not (tmp_path / "off" / "tensorboard").exists()


def test_regroup_recovery_measures_jump_and_steps_back_to_the_pre_regroup_window():
  rows = [{"step": 10, "train/ce_loss": 5.0}, {"step": 20, "train/ce_loss": 4.8},
          {"step": 20, "regroup/loss_before": 4.7, "regroup/loss_after": 5.2, "regroup/adopted": [True, False],
           "regroup/stability": [0.5, 0.0]},
          {"step": 30, "train/ce_loss": 5.1}, {"step": 40, "train/ce_loss": 4.9}, {"step": 50, "train/ce_loss": 4.75},
          {"step": 50, "regroup/loss_before": 4.7, "regroup/loss_after": 4.7, "regroup/adopted": [False, False],
           "regroup/stability": [0.0, 0.0]},
          {"step": 60, "train/ce_loss": 4.8}]
  first, second = regroup_recovery(rows)
  assert first["step"] == 20 and first["recovery_steps"] == 30  # Back to <= 4.8 in the window ending at step 50.
  np.testing.assert_allclose([first["jump"], first["adopted"], first["stability"]], [0.5, 0.5, 0.25])
  assert second["recovery_steps"] is None  # 4.8 > 4.75 and training ended.
  assert regroup_recovery([{"step": 1, "train/ce_loss": 3.0}]) == []
