"""Tiny configs and dummy batches shared by tests, notebooks and benchmarks."""

from __future__ import annotations

import dataclasses

import numpy as np

from hmoe.config import DataConfig, ExperimentConfig, ModelConfig, MoEConfig, TrainConfig


def tiny_config(**model_overrides) -> ExperimentConfig:
  """A 2-layer dense+MoE model (D=32, 4 experts, top-2) that compiles and steps in about a second on CPU."""
  model = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16,
                      ffn_pattern="dense,moe", moe=MoEConfig(num_experts=4, top_k=2, expert_ff=32))
  model = dataclasses.replace(model, **model_overrides)
  config = ExperimentConfig(
      model=model,
      data=DataConfig(seq_len=16, batch_size=8, eval_batch_size=8),
      train=TrainConfig(num_steps=10, learning_rate=1e-2, warmup_steps=2, log_every=1, eval_every=5,
                        checkpoint_every=5, mesh_shape=(1, 1, 1)),
  )
  config.validate()
  return config


def dummy_batch(config: ExperimentConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens of the config's batch shape; targets are inputs shifted by one, as in real batches."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
