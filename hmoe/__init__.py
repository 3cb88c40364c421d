"""hmoe: hierarchical Mixture-of-Experts language models in JAX/Flax.

`import hmoe` gives the model, its configs, routing and clustering; the training stack (optimizer, loop, checkpoints)
is `hmoe.train` and the data pipeline `hmoe.data`, imported on their own so that using a model does not pull in orbax
or the tokenizer.
"""

import os as _os

# XLA:CPU's concurrency-optimised scheduler deadlocks on the jitted regroup step (`hmoe.clustering.regroup`) with the
# router similarity signal: on 2 cores the step never returns and the CPU sits idle (JAX 0.10.2; reproduced with a
# quick-start run regrouping at step 10 or 100). With the default scheduler it runs, and training is no slower
# (4,450-4,570 vs 4,050-4,180 tokens/s, narrow HMoE). Set here, before JAX starts its CPU backend, unless the user
# chose a value; it has no effect if a backend was already initialised before hmoe was imported.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER_FLAG not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}=false".strip()

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
