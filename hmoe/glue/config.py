"""The fine-tuning config: what `experiments/glue.py` reads, validated before anything loads or compiles.

`FinetuneConfig` is the recipe (task, starting point, optimisation); `effective_experiment` turns it and the starting
model's `ExperimentConfig` into the one the fine-tuning run actually uses (trunk dropout, auxiliary-loss weights,
regrouping on or off, the optimiser schedule), so the training step, the regroup step and the routing state of
pretraining apply unchanged.
"""

from __future__ import annotations

import dataclasses
import math

from hmoe.config import ExperimentConfig, TrainConfig
from hmoe.glue.model import POOLINGS
from hmoe.glue.tasks import get_task

INPUTS = ("tsv", "tfds")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  task: str = "rte"
  # Exactly one starting point: a pretraining run directory (its config, tokenizer, newest checkpoint and routing
  # state), or a pretraining config spec "narrow.py:moe" (experiments/configs/) for a model trained from scratch.
  init_from: str = ""
  scratch_config: str = ""
  glue_dir: str | None = None  # Folder with CoLA/, SST-2/, ...; None: $HMOE_DATA_DIR/glue, else ../shared/data/glue.
  input: str = "tsv"  # "tfds": tensorflow-datasets' glue builder instead of the TSV files.
  pooling: str = "last"
  head_dropout: float = 0.1
  dropout_rate: float = 0.1  # Trunk dropout while fine-tuning (the pretrained value is replaced).
  learning_rate: float = 1e-3
  warmup_fraction: float = 0.1  # Of all steps; then cosine decay to learning_rate * min_lr_ratio.
  min_lr_ratio: float = 0.0
  weight_decay: float = 0.01
  batch_size: int = 32
  eval_batch_size: int = 128
  num_epochs: int = 3
  max_steps: int = 0  # > 0: stop after this many steps even if the epochs are not done (large tasks on a CPU).
  max_len: int = 128  # Tokens per example, separators included (at most the model's context).
  seed: int = 0
  # MoE/HMoE auxiliary losses while fine-tuning; None keeps the pretrained run's weights.
  balance_loss_weight: float | None = None
  z_loss_weight: float | None = None
  cluster_balance_loss_weight: float | None = None
  regroup: bool = False  # HMoE: keep regrouping experts at the pretrained run's interval while fine-tuning.
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 2

  def validate(self) -> None:
    get_task(self.task)
    _require(bool(self.init_from) != bool(self.scratch_config),
             "set exactly one of finetune.init_from (a pretraining run) and finetune.scratch_config "
             "(e.g. narrow.py:moe)")
    _require(self.input in INPUTS, f"finetune.input={self.input!r} not in {INPUTS}")
    _require(self.pooling in POOLINGS, f"finetune.pooling={self.pooling!r} not in {POOLINGS}")
    for name in ("head_dropout", "dropout_rate"):
      value = getattr(self, name)
      _require(0.0 <= value < 1.0, f"finetune.{name} must be in [0, 1), got {value}")
    _require(self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"finetune.learning_rate must be > 0, got {self.learning_rate}")
    _require(0.0 <= self.warmup_fraction < 1.0,
             f"finetune.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
    for name in ("batch_size", "eval_batch_size", "num_epochs", "log_every", "checkpoint_every", "keep_checkpoints"):
      value = getattr(self, name)
      _require(isinstance(value, int) and value >= 1, f"finetune.{name} must be a positive int, got {value!r}")
    _require(isinstance(self.max_steps, int) and self.max_steps >= 0,
             f"finetune.max_steps must be an int >= 0, got {self.max_steps!r}")
    _require(self.max_len >= 4, f"finetune.max_len must be >= 4, got {self.max_len}")
    for name in ("balance_loss_weight", "z_loss_weight", "cluster_balance_loss_weight"):
      value = getattr(self, name)
      _require(value is None or (value >= 0 and math.isfinite(value)), f"finetune.{name} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class GlueRunConfig:
  """What a fine-tuning run's `config.json` records: the recipe and the effective model/optimiser it implies."""

  finetune: FinetuneConfig
  experiment: ExperimentConfig


def from_dict(values: dict) -> FinetuneConfig:
  fields = {field.name for field in dataclasses.fields(FinetuneConfig)}
  unknown = sorted(set(values) - fields)
  _require(not unknown, f"unknown config keys {['finetune.' + key for key in unknown]}")
  config = FinetuneConfig(**values)
  config.validate()
  return config


def effective_experiment(finetune: FinetuneConfig, pretrained: ExperimentConfig, num_steps: int) -> ExperimentConfig:
  """The pretrained model with the fine-tuning overrides, and a `TrainConfig` for `num_steps` fine-tuning steps."""
  model = dataclasses.replace(pretrained.model, dropout_rate=finetune.dropout_rate)
  routed_kind = model.routed_kind
  if routed_kind is not None:
    routed = getattr(model, routed_kind)
    overrides = {name: getattr(finetune, name) for name in ("balance_loss_weight", "z_loss_weight")
                 if getattr(finetune, name) is not None}
    # Fine-tuning runs on one device (the mesh below); the expert-parallel layer computes the same function.
    overrides["expert_parallel"] = False
    if routed_kind == "hmoe":
      if finetune.cluster_balance_loss_weight is not None:
        overrides["cluster_balance_loss_weight"] = finetune.cluster_balance_loss_weight
      if not finetune.regroup:
        overrides["recluster_every"] = 0
    model = dataclasses.replace(model, **{routed_kind: dataclasses.replace(routed, **overrides)})
  train = TrainConfig(
      seed=finetune.seed, num_steps=num_steps, learning_rate=finetune.learning_rate,
      warmup_steps=min(int(finetune.warmup_fraction * num_steps), num_steps - 1), min_lr_ratio=finetune.min_lr_ratio,
      weight_decay=finetune.weight_decay, b1=pretrained.train.b1, b2=pretrained.train.b2,
      grad_clip_norm=pretrained.train.grad_clip_norm,
      fan_in_lr_base=pretrained.train.fan_in_lr_base,  # Part of the model's parametrisation: kept.
      log_every=finetune.log_every, checkpoint_every=finetune.checkpoint_every,
      keep_checkpoints=finetune.keep_checkpoints, mesh_shape=(1, 1, 1))
  data = dataclasses.replace(pretrained.data, batch_size=finetune.batch_size,
                             eval_batch_size=finetune.eval_batch_size, seq_len=min(finetune.max_len, model.max_len))
  experiment = ExperimentConfig(model=model, data=data, train=train)
  experiment.validate()
  return experiment
