"""Load-balance statistics and parameter counts."""

import functools

import jax
import numpy as np

from experiments.analysis import regroup_recovery
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import TransformerLM
from hmoe.testing import tiny_config
from hmoe.train import optimizer as optimizer_lib, state as state_lib
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


def test_metrics_writer_appends_json_lines(tmp_path):
  writer = MetricsWriter(tmp_path / "m.jsonl")
  writer.write(1, {"loss": np.float32(2.5), "load": np.array([0.5, 0.5])})
  MetricsWriter(tmp_path / "m.jsonl").write(2, {"loss": 2.0})  # Reopened, as after a resume.
  assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1, "loss": 2.5, "load": [0.5, 0.5]},
                                                 {"step": 2, "loss": 2.0}]


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
