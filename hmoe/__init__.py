"""hmoe: hierarchical Mixture-of-Experts language models in JAX/Flax."""

from hmoe.config import DataConfig, ExperimentConfig, ModelConfig, MoEConfig, TrainConfig, from_config_dict
from hmoe.model import TransformerLM, cross_entropy
from hmoe.moe import MoEFeedForward, MoEStats
from hmoe.routing import Router, RouterOutput

__all__ = [
    "DataConfig", "ExperimentConfig", "ModelConfig", "MoEConfig", "TrainConfig", "from_config_dict",
    "TransformerLM", "cross_entropy", "MoEFeedForward", "MoEStats", "Router", "RouterOutput",
]
