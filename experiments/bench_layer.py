"""MoE layer throughput: dense FFN (same active FLOPs) vs the MoE dispatch paths and HMoE, in one process.

  python -m experiments.bench_layer                      # forward, the README table
  python -m experiments.bench_layer --backward           # forward + backward
  python -m experiments.bench_layer --paths=sort,hmoe4,hmoe8 --experts=32   # standard vs hierarchical MoE

Each variant is jitted, warmed up, then timed as the median of --repeats calls with `block_until_ready`. Ratios are
relative to the dense SwiGLU FFN whose hidden width is top_k * expert_ff (the same active FLOPs per token).
"""

import jax
from absl import app, flags

from experiments.benchmark import format_table, layer_seconds
from hmoe.config import HMoEConfig, MoEConfig
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.model.layers import DenseFeedForward
from hmoe.model.moe import MoEFeedForward

_TOKENS = flags.DEFINE_list("tokens", ["2048", "8192"], "Token counts (one routing group).")
_EXPERTS = flags.DEFINE_list("experts", ["8", "16", "32"], "Expert counts.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width D.")
_EXPERT_FF = flags.DEFINE_integer("expert_ff", 1024, "Expert hidden width F.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_PATHS = flags.DEFINE_list("paths", ["sort", "dropless", "einsum"],
                           "Variants: sort, dropless, einsum (standard MoE); hmoeM (hierarchical, M experts per "
                           "cluster, top-1 cluster, top-K experts inside, rank --rank).")
_RANK = flags.DEFINE_integer("rank", 16, "Residual rank R of the hmoe variants.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant (median reported).")
_BACKWARD = flags.DEFINE_bool("backward", False, "Time forward + backward instead of forward only.")


def _timed(module, x, **kwargs) -> float:
  return layer_seconds(module, x, backward=_BACKWARD.value, repeats=_REPEATS.value, **kwargs)


def _layer(path: str, num_experts: int):
  if path.startswith("hmoe"):
    members = int(path[len("hmoe"):])
    return HMoEFeedForward(HMoEConfig(num_experts=num_experts, num_clusters=num_experts // members,
                                      rank=_RANK.value, top_k_clusters=1, top_k_experts=_TOP_K.value,
                                      expert_ff=_EXPERT_FF.value))
  return MoEFeedForward(MoEConfig(num_experts=num_experts, top_k=_TOP_K.value, expert_ff=_EXPERT_FF.value,
                                  dispatch="einsum" if path == "einsum" else "sort", dropless=path == "dropless"))


def main(argv):
  del argv
  rows = []
  for num_tokens in map(int, _TOKENS.value):
    x = jax.random.normal(jax.random.PRNGKey(1), (1, num_tokens, _D_MODEL.value))
    dense_s = _timed(DenseFeedForward(_TOP_K.value * _EXPERT_FF.value), x)
    rows.append({"tokens": num_tokens, "experts": "-", "variant": "dense FFN", "ms": dense_s * 1e3,
                 "tokens/s": num_tokens / dense_s, "time vs dense": 1.0})
    for num_experts in map(int, _EXPERTS.value):
      for path in _PATHS.value:
        seconds = _timed(_layer(path, num_experts), x, train=True)
        label = f"HMoE M={path[len('hmoe'):]} R={_RANK.value}" if path.startswith("hmoe") else f"MoE {path}"
        rows.append({"tokens": num_tokens, "experts": num_experts, "variant": label, "ms": seconds * 1e3,
                     "tokens/s": num_tokens / seconds, "time vs dense": seconds / dense_s})
      print(format_table(rows[-len(_PATHS.value):], ["tokens", "experts", "variant", "ms", "time vs dense"]),
            flush=True)
  mode = "forward+backward" if _BACKWARD.value else "forward"
  print(f"\n{mode}, D={_D_MODEL.value}, F={_EXPERT_FF.value}, top-{_TOP_K.value}, capacity factor 1.25, "
        f"{jax.devices()[0].platform}, median of {_REPEATS.value}\n")
  print(format_table(rows, ["tokens", "experts", "variant", "ms", "tokens/s", "time vs dense"]))


if __name__ == "__main__":
  app.run(main)
