"""Pooling of seed repeats in experiments/summarize.py (the tool behind README's multi-seed tables)."""

import math

import pytest

from experiments import summarize


def test_final_perplexities_takes_the_last_evaluation_of_each_split():
  rows = [{"step": 500, "valid/word_perplexity": 300.0}, {"step": 900, "train/loss": 4.0},
          {"step": 1000, "valid/word_perplexity": 250.0, "test/word_perplexity": 240.0}]
  assert summarize.final_perplexities(rows) == {"valid": 250.0, "test": 240.0}
  assert summarize.final_perplexities([{"step": 1, "train/loss": 5.0}]) == {}


@pytest.mark.parametrize("name, expected", [("dense", ("dense", 0)), ("dense_d01_s2", ("dense_d01", 2)),
                                            ("sh_s1x", ("sh_s1x", 0)), ("e8_s12", ("e8", 12))])
def test_split_seed(name, expected):
  assert summarize.split_seed(name) == expected


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
  assert "| moe | 0,1,2 | 132.00 ± 2.00 | 122.00 ± 2.83 |" in table
  assert "| dense | 0 | 140.00 | 129.00 |" in table


def test_pool_seeds_rejects_a_seed_given_twice():
  with pytest.raises(ValueError, match="repeats seed 0"):
    summarize.pool_seeds({"moe": {"valid": 1.0}, "moe_s0": {"valid": 2.0}})
