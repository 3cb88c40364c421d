"""Pooling of seed repeats in experiments/summarize.py (the tool behind README's multi-seed tables)."""

import json
import math

import flax.linen as nn
import jax.numpy as jnp
import pytest

from experiments import analysis, summarize
from experiments.configs import tiny
from hmoe.config import from_config_dict
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import TransformerLM
from hmoe.testing import init_params


def test_run_summary_takes_the_last_evaluation_and_averages_the_training_tail():
  rows = [{"step": 500, "valid/word_perplexity": 300.0, "train/ce_loss": 9.0, "train/load_cv": 0.9},
          {"step": 900, "train/ce_loss": 4.0, "train/load_cv": 0.5}, {"step": 950, "train/ce_loss": 3.0},
          {"step": 1000, "valid/word_perplexity": 250.0, "test/word_perplexity": 240.0}]
  summary = summarize.run_summary(rows, tail_logs=2)
  assert summary["valid"] == 250.0 and summary["test"] == 240.0
  assert math.isclose(summary["train_ce"], 3.5)  # The last two rows that log it, not the step-500 one.
  assert math.isclose(summary["load_cv"], 0.7)  # Dense runs log no load CV; MoE runs do on every window.
  assert summarize.run_summary([{"step": 1, "train/loss": 5.0}], tail_logs=2) == {}
  assert analysis.final_word_perplexities(rows) == {"valid": 250.0, "test": 240.0}


@pytest.mark.parametrize("name, expected", [("dense", ("dense", 0)), ("dense_d01_s2", ("dense_d01", 2)),
                                            ("sh_s1x", ("sh_s1x", 0)), ("e8_s12", ("e8", 12))])
def test_split_seed(name, expected):
  assert analysis.split_seed(name) == expected


def test_pool_seeds_groups_repeats_with_mean_and_sample_std():
  rows = summarize.pool_seeds({
      "moe": {"valid": 130.0, "test": 120.0}, "moe_s1": {"valid": 134.0, "test": 124.0},
      "moe_s2": {"valid": 132.0}, "dense": {"valid": 140.0, "test": 129.0}})
  assert [row["group"] for row in rows] == ["dense", "moe"]
  dense, moe = rows
  assert moe["seeds"] == [0, 1, 2]
  assert moe["valid"]["values"] == [130.0, 134.0, 132.0]
  assert math.isclose(moe["valid"]["mean"], 132.0) and math.isclose(moe["valid"]["std"], 2.0)
  assert moe["test"]["values"] == [120.0, 124.0]  # Seed 2 has no test number: left out, not counted as zero.
  assert math.isnan(dense["valid"]["std"])  # One seed has no spread.
  table = summarize.format_rows(rows)
  assert ("| moe | 0,1,2 | - / - / - | 132.00 ± 2.00 | 122.00 ± 2.83 | - | - | - | 130.00, 134.00, 132.00 | - | - |"
          in table)
  assert "| dense | 0 | - / - / - | 140.00 | 129.00 |" in table


def test_pool_seeds_rejects_a_seed_given_twice():
  with pytest.raises(ValueError, match="repeats seed 0"):
    summarize.pool_seeds({"moe": {"valid": 1.0}, "moe_s0": {"valid": 2.0}})


def test_experts_used_counts_each_layers_experts_above_one_percent_of_the_last_window():
  rows = [{"step": 1, "train/expert_load": [[0.25] * 4, [0.25] * 4]},
          {"step": 2, "train/expert_load": [[0.97, 0.02, 0.01, 0.0], [0.5, 0.5, 0.0, 0.0]]},
          {"step": 2, "regroup/adopted": [True, False]}, {"step": 3, "regroup/adopted": [True, True]},
          {"step": 3, "valid/word_perplexity": 200.0}]
  summary = summarize.run_summary(rows, tail_logs=2)
  assert summary["experts_used"] == [2, 2]  # Exactly 1% is not "more than 1%".
  assert summary["regroups"] == (3, 4)
  assert "experts_used" not in summarize.run_summary([{"step": 1, "valid/word_perplexity": 3.0}], tail_logs=1)
  table = summarize.format_rows(summarize.pool_seeds({"moe": {**summary, "params_total": 2_270_000},
                                                      "moe_s1": {**summary, "experts_used": [4, 1]}}))
  assert table.splitlines()[-1].endswith("| 3/4; 3/4 | 2/2; 4/1 |")
  assert "| moe | 0,1 | 2.27M / - / - |" in table


def test_parameter_columns_count_the_model_in_the_runs_config(tmp_path):
  raw = tiny.get_config("moe").to_dict()
  (tmp_path / "config.json").write_text(json.dumps(raw))
  config = from_config_dict(raw)
  expected = parameter_counts(nn.meta.unbox(init_params(TransformerLM(config.model),
                                                        jnp.zeros((1, 8), jnp.int32))), config.model)
  columns = summarize.parameter_columns(summarize.read_config(tmp_path))
  assert columns == {name: expected[name] for name in ("params_total", "params_expert", "params_active")}
  assert 0 < columns["params_expert"] < columns["params_total"]
  assert summarize.read_config(tmp_path / "missing") is None
  assert summarize.parameter_columns(None) == {}


def test_a_run_counts_as_finished_only_once_evaluated_at_its_last_step(tmp_path):
  raw = tiny.get_config("moe").to_dict()
  raw["train"]["num_steps"] = 30
  (tmp_path / "config.json").write_text(json.dumps(raw))
  config = summarize.read_config(tmp_path)
  partial = [{"step": 10, "valid/word_perplexity": 500.0}, {"step": 30, "train/loss": 4.0}]
  assert not summarize.finished(partial, config)
  assert summarize.finished(partial + [{"step": 30, "valid/word_perplexity": 300.0}], config)
  assert summarize.finished(partial, summarize.read_config(tmp_path / "no_config"))


def test_train_minutes_add_up_each_logged_windows_steps_at_its_tokens_per_second(tmp_path):
  raw = tiny.get_config("moe").to_dict()
  raw["data"].update(batch_size=4, seq_len=16)  # 64 tokens per step.
  raw["train"]["log_every"] = 20
  (tmp_path / "config.json").write_text(json.dumps(raw))
  config = summarize.read_config(tmp_path)
  rows = [{"step": 0, "model/params_total": 1}, {"step": 10, "train/tokens_per_second": 64.0},
          {"step": 10, "valid/word_perplexity": 9.0}, {"step": 30, "train/tokens_per_second": 32.0}]
  assert math.isclose(summarize.train_minutes(rows, config), (10 * 1.0 + 20 * 2.0) / 60)
  assert summarize.train_minutes(rows[:1], config) is None and summarize.train_minutes(rows, None) is None
  raw["train"]["log_every"] = 10  # An upcycled run: its first window ends at step 510 but holds 10 steps.
  (tmp_path / "config.json").write_text(json.dumps(raw))
  upcycled = [{"step": 510, "train/tokens_per_second": 64.0}]
  assert math.isclose(summarize.train_minutes(upcycled, summarize.read_config(tmp_path)), 10 / 60)
  table = summarize.format_rows(summarize.pool_seeds({"moe": {"valid": 5.0, "train_minutes": 12.34}}))
  assert "| 5.00 | - | - | - | 12.3 |" in table
