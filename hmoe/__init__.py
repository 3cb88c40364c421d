"""hmoe: hierarchical Mixture-of-Experts language models in JAX/Flax.

`import hmoe` gives the model, its configs, routing and clustering; the training stack (optimizer, loop, checkpoints)
is `hmoe.train` and the data pipeline `hmoe.data`, imported on their own so that using a model does not pull in orbax
or the tokenizer.
"""

from hmoe.clustering.convert import convert_moe_params, hmoe_model_config
from hmoe.clustering.regroup import recluster
from hmoe.clustering.state import ClusterState
from hmoe.config import (
                         DataConfig,
                         ExperimentConfig,
                         HMoEConfig,
                         ModelConfig,
                         MoEConfig,
                         RoutedConfig,
                         TrainConfig,
                         base_config,
                         from_config_dict,
)
from hmoe.model.ffn import FeedForward, ffn_layer
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.model.moe import MoEFeedForward
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import TransformerLM, cross_entropy
from hmoe.routing.routers import (
                         HierarchicalRouter,
                         HierarchicalRouterOutput,
                         Router,
                         RouterOutput,
                         hierarchical_routing,
                         top_k_routing,
)
from hmoe.routing.state import RoutingState, init_routing_state
from hmoe.routing.statistics import RoutingStats

__all__ = [
    "ClusterState", "DataConfig", "ExperimentConfig", "FeedForward", "HMoEConfig", "HMoEFeedForward",
    "HierarchicalRouter", "HierarchicalRouterOutput", "ModelConfig", "MoEConfig", "MoEFeedForward", "RoutedConfig",
    "Router", "RouterOutput", "RoutingState", "RoutingStats", "TrainConfig", "TransformerLM", "base_config",
    "convert_moe_params", "cross_entropy", "ffn_layer", "from_config_dict", "hierarchical_routing",
    "hmoe_model_config", "init_routing_state", "parameter_counts", "recluster", "top_k_routing",
]
