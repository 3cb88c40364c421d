"""Typed, validated configuration for models, data and training.

Experiment files under `experiments/configs/` build an `ml_collections.ConfigDict` (easy to override from the command
line: `--config.model.moe.num_experts=16`). At the library boundary `from_config_dict` turns it into the frozen
dataclasses below, and every value is checked *before* anything is traced or compiled, so a typo costs a clear
`ValueError` naming the field, not a shape error deep inside XLA.
"""

from __future__ import annotations

import abc
import dataclasses
import fractions
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
  import ml_collections

FFN_KINDS = ("dense", "moe", "hmoe")
SIMILARITY_SIGNALS = ("fused", "router")
DISPATCH_KINDS = ("sort", "einsum")
DTYPES = ("float32", "bfloat16")


def parse_ffn_pattern(pattern: str) -> tuple[str, ...]:
  """`"dense, moe"` -> `("dense", "moe")`: the FFN kinds of `ModelConfig.ffn_pattern`, in order."""
  return tuple(kind.strip() for kind in pattern.split(","))


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class RoutedConfig(abc.ABC):
  """Fields and checks every routed FFN kind shares; `MoEConfig` and `HMoEConfig` add their own.

  `section` names the config section in error messages (`--config.model.<section>.<field>`).
  """

  section: ClassVar[str] = "routed"
  # Whether the kind keeps per-expert activation statistics and regroups experts (`hmoe.clustering`).
  clusters_experts: ClassVar[bool] = False

  num_experts: int = 8
  expert_ff: int = 256  # Hidden width F of each SwiGLU expert.
  capacity_factor: float = 1.25  # Slots per expert (MoE) or per cluster (HMoE); ignored when dropless.
  dropless: bool = False  # Train without capacity: block-sparse grouped matmuls, no token is ever dropped.
  eval_capacity_factor: float = 2.0  # Used at evaluation only when eval_dropless is False.
  # Evaluate without drops. Capacity priority is k-major (GShard), so a later token's first choice can evict an
  # earlier token's second choice: with drops, perplexity would see a sliver of the future.
  eval_dropless: bool = True
  num_groups: int = 1  # Tokens are routed within groups (set to the data-parallel size on a pod).
  balance_loss_weight: float = 0.01  # Switch Transformer load-balancing loss.
  z_loss_weight: float = 1e-3  # ST-MoE router z-loss.
  router_jitter: float = 0.0  # Multiplicative uniform noise on router inputs during training (Switch, Sec. 2.2).
  # If True the balance and z losses train only the router kernel: their gradient stops at the router input instead of
  # also reshaping the token representations of the trunk. Forward values are unchanged.
  detach_aux_input: bool = False
  # Auxiliary-loss-free balancing (DeepSeek-V3 Sec. 2.1.2): a per-expert bias added to the router probabilities for
  # expert *selection* only (gates keep the unbiased probabilities); after each step it moves by this rate against
  # the sign of the expert's load error. 0 = off. The biases live in `hmoe.routing.RoutingState.selection_bias`.
  bias_update_rate: float = 0.0
  # Multiplies the routed output (DeepSeek-V2/V3 "routed scaling factor"). The renormalised gates of the k chosen
  # experts sum to 1, so the routed part is an *average* of k experts where a dense FFN of the same active width is a
  # *sum* of k blocks: each expert's output and its function-space learning rate are ~1/k of a dense block's.
  # Setting it to top_k restores the sum (no gain in the small.py probes, docs/dense_vs_moe.md).
  routed_scale: float = 1.0
  # Explicit expert parallelism (`hmoe.parallel.expert_parallel`) when the mesh has an expert axis > 1: shard_map +
  # all_to_all with per-destination-shard capacity (capacity_factor / eval_capacity_factor; a dropless setting
  # reserves the worst case, every row to one shard). False: XLA's partitioner decides from the logical axes.
  expert_parallel: bool = False

  @property
  def loss_weights(self) -> dict[str, float]:
    """Weight of each auxiliary loss, keyed by its `hmoe.routing.RoutingStats` field."""
    return {"balance_loss": self.balance_loss_weight, "z_loss": self.z_loss_weight}

  @abc.abstractmethod
  def active_fraction(self, param_name: str) -> fractions.Fraction | None:
    """Fraction of a routed layer's parameter `param_name` that one token uses; None for non-expert parameters.

    Every routed kind names its expert parameters here (`hmoe.model.param_counts`), so the base cannot be built.
    """

  def _check(self, condition: bool, field: str, requirement: str) -> None:
    _require(condition, f"{self.section}.{field} must be {requirement}, got {getattr(self, field)!r}")

  def validate(self) -> None:
    for field in ("num_experts", "expert_ff", "num_groups"):
      self._check(isinstance(getattr(self, field), int) and getattr(self, field) >= 1, field, "a positive int")
    for field in ("capacity_factor", "eval_capacity_factor", "routed_scale"):
      self._check(getattr(self, field) > 0, field, "> 0")
    for field in ("balance_loss_weight", "z_loss_weight", "bias_update_rate"):
      self._check(getattr(self, field) >= 0, field, ">= 0")
    self._check(0 <= self.router_jitter < 1, "router_jitter", "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class MoEConfig(RoutedConfig):
  """Standard top-k token-choice MoE (Switch / GShard family). Capacity: C = ceil(capacity_factor * T * K / E)."""

  section: ClassVar[str] = "moe"

  top_k: int = 2
  dispatch: str = "sort"  # "sort": sort + gather into [E, C, D]; "einsum": GShard one-hot einsum (reference/TPU).
  dropless_block_size: int = 128  # Row block of the dropless grouped matmul.

  def active_fraction(self, param_name: str) -> fractions.Fraction | None:
    if param_name in ("w_gate", "w_up", "w_down"):
      return fractions.Fraction(self.top_k, self.num_experts)
    return None

  def validate(self) -> None:
    super().validate()
    _require(1 <= self.top_k <= self.num_experts,
             f"moe.top_k={self.top_k} must be in [1, moe.num_experts={self.num_experts}]")
    _require(self.dispatch in DISPATCH_KINDS, f"moe.dispatch={self.dispatch!r} not in {DISPATCH_KINDS}")
    _require(not (self.dropless and self.dispatch == "einsum"),
             "moe.dropless=True needs moe.dispatch='sort' (the einsum path always has a capacity)")
    self._check(self.dropless_block_size >= 1, "dropless_block_size", ">= 1")


@dataclasses.dataclass(frozen=True)
class HMoEConfig(RoutedConfig):
  """Hierarchical MoE: G clusters of M = E / G experts, each expert matrix `W_e = B_c + U_e V_e` (rank R).

  Capacity is per cluster: C = ceil(capacity_factor * T * Kc / G).
  """

  section: ClassVar[str] = "hmoe"
  clusters_experts: ClassVar[bool] = True

  num_experts: int = 32
  num_clusters: int = 8
  rank: int = 16
  top_k_clusters: int = 1
  top_k_experts: int = 2
  block_size: int = 64  # Row block of the grouped low-rank matmuls inside clusters.
  cluster_balance_loss_weight: float = 0.01  # Switch loss over clusters (the expert one is over joint probabilities).
  residual_init_scale: float = 0.5  # Initial |U V| relative to |B|: experts start distinct but close to their base.
  # Regrouping (hmoe.clustering.regroup). 0 = never regroup: clusters stay as initialised.
  recluster_every: int = 0
  # What regrouping clusters experts by (`hmoe.clustering.pipeline.grouping_features`): "fused" = parameter sketch +
  # activation centroid (weighted by `similarity_alpha`); "router" = the experts' centred router rows.
  similarity_signal: str = "fused"
  similarity_alpha: float = 0.6  # Weight of parameter similarity against activation similarity ("fused" only).
  # Adopt a new grouping only if mean intra-cluster similarity rises by more than this (negative: always adopt).
  min_gain: float = 0.01
  centroid_ema: float = 0.05  # beta of the activation-centroid EMA.
  kmeans_iters: int = 10
  kmeans_seed: int = 0
  sketch_rows: int = 16  # Parameter sketch of each matrix: P^T W Q with P [I, rows], Q [O, cols].
  sketch_cols: int = 16
  # Quantization-aware training: the residual factors are fake-quantized to INT4 (groups of this many input rows, as
  # `hmoe.inference.storage` stores them) in the forward pass, with a straight-through gradient. 0 = off.
  qat_group_size: int = 0

  @property
  def experts_per_cluster(self) -> int:
    return self.num_experts // self.num_clusters

  @property
  def loss_weights(self) -> dict[str, float]:
    return {**super().loss_weights, "cluster_balance_loss": self.cluster_balance_loss_weight}

  def active_fraction(self, param_name: str) -> fractions.Fraction | None:
    if param_name.startswith("base_"):
      return fractions.Fraction(self.top_k_clusters, self.num_clusters)
    if param_name.startswith(("u_", "v_")):
      return fractions.Fraction(self.top_k_clusters * self.top_k_experts, self.num_experts)
    return None

  def validate(self) -> None:
    super().validate()
    _require(isinstance(self.num_clusters, int) and self.num_clusters >= 1
             and self.num_experts % self.num_clusters == 0,
             f"hmoe.num_clusters={self.num_clusters} must divide hmoe.num_experts={self.num_experts}")
    _require(1 <= self.top_k_clusters <= self.num_clusters,
             f"hmoe.top_k_clusters={self.top_k_clusters} must be in [1, num_clusters={self.num_clusters}]")
    _require(1 <= self.top_k_experts <= self.experts_per_cluster,
             f"hmoe.top_k_experts={self.top_k_experts} must be in [1, experts per cluster={self.experts_per_cluster}]")
    _require(1 <= self.rank <= self.expert_ff, f"hmoe.rank={self.rank} must be in [1, expert_ff={self.expert_ff}]")
    self._check(self.residual_init_scale > 0, "residual_init_scale", "> 0")
    self._check(self.cluster_balance_loss_weight >= 0, "cluster_balance_loss_weight", ">= 0")
    self._check(0 <= self.similarity_alpha <= 1, "similarity_alpha", "in [0, 1]")
    _require(self.similarity_signal in SIMILARITY_SIGNALS,
             f"hmoe.similarity_signal={self.similarity_signal!r} must be one of {SIMILARITY_SIGNALS}")
    self._check(0 < self.centroid_ema <= 1, "centroid_ema", "in (0, 1]")
    for field in ("recluster_every", "kmeans_iters"):
      self._check(getattr(self, field) >= 0, field, ">= 0")
    for field in ("sketch_rows", "sketch_cols", "block_size"):
      self._check(getattr(self, field) >= 1, field, ">= 1")
    self._check(self.qat_group_size == 0 or (self.qat_group_size >= 2 and self.qat_group_size % 2 == 0),
                "qat_group_size", "0 (off) or an even number >= 2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only pre-norm Transformer; each layer's FFN kind comes from `ffn_pattern`."""

  vocab_size: int = 8192
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  d_ff: int = 512  # Hidden width of the dense SwiGLU FFN.
  max_len: int = 256
  # Comma-separated FFN kinds, cycled over layers: "moe" = every layer, "dense,moe" = every other layer.
  ffn_pattern: str = "dense"
  # Width of an always-on SwiGLU "shared expert" added beside every routed (moe/hmoe) FFN (DeepSeekMoE, Dai et al.
  # 2024): features every token needs are learned once, with every token's gradient, instead of in each expert.
  # 0 = none. Counts as active, non-expert parameters.
  shared_expert_ff: int = 0
  tie_embeddings: bool = True
  dtype: str = "float32"  # Compute dtype; parameters are always float32.
  rope_base: float = 10_000.0
  # Dropout on the embeddings and on each block's attention and FFN outputs before the residual add (GPT-2 style),
  # training only. WikiText-2 is small enough that multi-epoch runs overfit (docs/dense_vs_moe.md); 0 = off.
  dropout_rate: float = 0.0
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
  hmoe: HMoEConfig = dataclasses.field(default_factory=HMoEConfig)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def ffn_kinds(self) -> tuple[str, ...]:
    """The FFN kind of every layer: `ffn_pattern` cycled over `num_layers`."""
    pattern = parse_ffn_pattern(self.ffn_pattern)
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

  @property
  def routed_kind(self) -> str | None:
    """The routed FFN kind of this model ("moe" or "hmoe"), None if all layers are dense."""
    kinds = set(parse_ffn_pattern(self.ffn_pattern)) - {"dense"}
    return kinds.pop() if kinds else None

  @property
  def routed(self) -> RoutedConfig | None:
    """The config section of the routed layers (`moe` or `hmoe`), None for an all-dense model."""
    return getattr(self, self.routed_kind) if self.routed_kind else None

  @property
  def routed_layers(self) -> tuple[int, ...]:
    """Indices of the layers with routed experts."""
    return tuple(i for i, kind in enumerate(self.ffn_kinds) if kind != "dense")

  @property
  def num_routed_layers(self) -> int:
    return len(self.routed_layers)

  def validate(self) -> None:
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
      value = getattr(self, name)
      _require(isinstance(value, int) and value >= 1, f"model.{name} must be a positive int, got {value!r}")
    _require(self.d_model % self.num_heads == 0,
             f"model.num_heads={self.num_heads} must divide model.d_model={self.d_model}")
    _require(self.head_dim % 2 == 0, f"head_dim=d_model/num_heads={self.head_dim} must be even for rotary positions")
    kinds = parse_ffn_pattern(self.ffn_pattern)
    bad = [kind for kind in kinds if kind not in FFN_KINDS]
    _require(not bad, f"model.ffn_pattern={self.ffn_pattern!r} has unknown kinds {bad}; allowed: {FFN_KINDS}")
    _require(self.dtype in DTYPES, f"model.dtype={self.dtype!r} not in {DTYPES}")
    _require(self.rope_base > 0, f"model.rope_base must be > 0, got {self.rope_base}")
    _require(0.0 <= self.dropout_rate < 1.0, f"model.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    _require(isinstance(self.shared_expert_ff, int) and self.shared_expert_ff >= 0,
             f"model.shared_expert_ff must be an int >= 0, got {self.shared_expert_ff!r}")
    _require(not {"moe", "hmoe"} <= set(kinds),
             f"model.ffn_pattern={self.ffn_pattern!r} mixes 'moe' and 'hmoe'; compare them in separate models")
    if self.routed is not None:
      self.routed.validate()
    if self.routed_kind == "hmoe":
      # Each factored matrix is [D, F] or [F, D]: a rank above min(D, F) has no truncated SVD to re-initialise from.
      _require(self.hmoe.rank <= min(self.d_model, self.hmoe.expert_ff),
               f"hmoe.rank={self.hmoe.rank} must be <= min(model.d_model={self.d_model}, "
               f"hmoe.expert_ff={self.hmoe.expert_ff}), the rank of the matrices it factors")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "wikitext-2"
  data_dir: str | None = None  # None: $HMOE_DATA_DIR, else ../shared/data.
  seq_len: int = 128
  batch_size: int = 16
  eval_batch_size: int = 16
  eval_splits: tuple[str, ...] = ("valid",)

  def validate(self) -> None:
    _require(self.dataset in ("wikitext-2", "wikitext-103"), f"data.dataset={self.dataset!r} is not a WikiText set")
    for name in ("seq_len", "batch_size", "eval_batch_size"):
      value = getattr(self, name)
      _require(isinstance(value, int) and value >= 1, f"data.{name} must be a positive int, got {value!r}")
    bad = [split for split in self.eval_splits if split not in ("train", "valid", "test")]
    _require(not bad, f"data.eval_splits has unknown splits {bad}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  num_steps: int = 1000
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1  # Cosine decays to learning_rate * min_lr_ratio.
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip_norm: float = 1.0
  # If > 0, the learning rate of every SwiGLU output projection (`w_down`: dense FFN, shared expert, routed experts) is
  # multiplied by fan_in_lr_base / fan_in, the muP rule for Adam on hidden matrices. With fan_in_lr_base = the dense
  # d_ff the base LR was tuned at, narrow experts move their output as fast per step as the dense FFN does. 0: off.
  fan_in_lr_base: int = 0
  log_every: int = 50
  eval_every: int = 500
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  # Device mesh over ("data", "expert", "model"); one -1 takes the remaining devices.
  mesh_shape: tuple[int, int, int] = (-1, 1, 1)

  def validate(self) -> None:
    _require(self.num_steps >= 1, f"train.num_steps must be >= 1, got {self.num_steps}")
    _require(isinstance(self.seed, int) and self.seed >= 0, f"train.seed must be an int >= 0, got {self.seed!r}")
    _require(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
    # Strictly below num_steps: the cosine part of the schedule needs at least one step (optax rejects zero).
    _require(0 <= self.warmup_steps < self.num_steps,
             f"train.warmup_steps={self.warmup_steps} must be in [0, num_steps={self.num_steps})")
    _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
    _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
    _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"train.b1={self.b1}, train.b2={self.b2} must be in [0, 1)")
    _require(self.grad_clip_norm > 0, f"train.grad_clip_norm must be > 0, got {self.grad_clip_norm}")
    _require(self.fan_in_lr_base >= 0, f"train.fan_in_lr_base must be >= 0 (0 = off), got {self.fan_in_lr_base}")
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      value = getattr(self, name)
      _require(value >= 1, f"train.{name} must be >= 1, got {value}")
    _require(len(self.mesh_shape) == 3 and all(size == -1 or size >= 1 for size in self.mesh_shape)
             and list(self.mesh_shape).count(-1) <= 1,
             f"train.mesh_shape={self.mesh_shape} must be 3 sizes (data, expert, model), at most one of them -1")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelConfig
  data: DataConfig
  train: TrainConfig

  def validate(self) -> None:
    _check_finite(self, "")
    self.model.validate()
    self.data.validate()
    self.train.validate()
    _require(self.data.seq_len <= self.model.max_len,
             f"data.seq_len={self.data.seq_len} exceeds model.max_len={self.model.max_len}")
    if self.model.routed is not None:
      groups, section = self.model.routed.num_groups, self.model.routed_kind
      for name in ("batch_size", "eval_batch_size"):
        tokens = getattr(self.data, name) * self.data.seq_len
        _require(tokens % groups == 0, f"{section}.num_groups={groups} must divide {name}*seq_len={tokens}")


_SECTIONS = {"moe": MoEConfig, "hmoe": HMoEConfig}


def _check_finite(config: Any, prefix: str) -> None:
  """Every float field of a config tree is finite: inf or nan would pass range checks like `> 0` and fail later."""
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      _check_finite(value, f"{prefix}{field.name}.")
    elif isinstance(value, float):
      _require(math.isfinite(value), f"{prefix}{field.name} must be finite, got {value!r}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
  """Builds dataclass `cls` from a mapping, rejecting unknown keys by name."""
  fields = {field.name: field for field in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  _require(not unknown, f"unknown config keys {[prefix + key for key in unknown]}")
  kwargs = {}
  for key, value in values.items():
    if key in _SECTIONS:
      value = _build(_SECTIONS[key], value, prefix + key + ".")
    elif key in ("eval_splits", "mesh_shape"):
      value = tuple(value)
    kwargs[key] = value
  return cls(**kwargs)


def from_config_dict(config: Mapping[str, Any]) -> ExperimentConfig:
  """Converts an `ml_collections.ConfigDict` (or nested dict) into a validated `ExperimentConfig`."""
  as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  unknown = sorted(set(as_dict) - {"model", "data", "train"})
  _require(not unknown, f"unknown top-level config sections {unknown}")
  experiment = ExperimentConfig(
      model=_build(ModelConfig, as_dict.get("model", {}), "model."),
      data=_build(DataConfig, as_dict.get("data", {}), "data."),
      train=_build(TrainConfig, as_dict.get("train", {}), "train."),
  )
  experiment.validate()
  return experiment


def base_config() -> "ml_collections.ConfigDict":
  """A ConfigDict holding every field at its default, so any field can be overridden from the command line.

  Experiment configs start from this and change what they need; `--config.model.moe.dropless=True` then works even
  for fields the experiment file does not mention.
  """
  import ml_collections  # Local: the library itself does not need ml_collections, only config files do.

  defaults = dataclasses.asdict(ExperimentConfig(model=ModelConfig(), data=DataConfig(), train=TrainConfig()))
  defaults["data"]["data_dir"] = ml_collections.config_dict.placeholder(str)
  return ml_collections.ConfigDict(defaults)
