"""hmoe: hierarchical Mixture-of-Experts language models in JAX/Flax."""

from hmoe.config import (DataConfig, ExperimentConfig, HMoEConfig, ModelConfig, MoEConfig, TrainConfig, base_config,
                         from_config_dict)
from hmoe.convert import convert_moe_params, hmoe_model_config
from hmoe.hierarchical import HMoEFeedForward, HMoEStats
from hmoe.model import TransformerLM, cross_entropy
from hmoe.moe import MoEFeedForward, MoEStats
from hmoe.regroup import ClusterState, recluster
from hmoe.routing import HierarchicalRouterOutput, Router, RouterOutput, hierarchical_routing, top_k_routing
from hmoe.step import TrainState, eval_step, init_train_state, make_optimizer, train_step
from hmoe.train import train_and_evaluate

__all__ = [
    "DataConfig", "ExperimentConfig", "HMoEConfig", "ModelConfig", "MoEConfig", "TrainConfig", "base_config",
    "from_config_dict", "convert_moe_params", "hmoe_model_config", "HMoEFeedForward", "HMoEStats", "TransformerLM",
    "cross_entropy", "MoEFeedForward",
    "MoEStats", "ClusterState", "recluster", "HierarchicalRouterOutput", "Router", "RouterOutput",
    "hierarchical_routing", "top_k_routing", "TrainState", "eval_step", "init_train_state", "make_optimizer",
    "train_step", "train_and_evaluate",
]
