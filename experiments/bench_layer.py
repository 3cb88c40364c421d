"""MoE layer throughput: dense FFN (same active FLOPs) vs the MoE dispatch paths and HMoE, in one process.

  python -m experiments.bench_layer                      # forward, the table of docs/speed.md
  python -m experiments.bench_layer --backward           # forward + backward
  python -m experiments.bench_layer --paths=sort,hmoe4,hmoe8 --experts=32   # standard vs hierarchical MoE
  python -m experiments.bench_layer --backward --tokens=2048,8192,32768 --expert_ff=512,1024,2048 --experts=8,16,32,64

Each variant is jitted and warmed up; then all variants of one (T, F), the matmul reference included, are timed
round-robin (`benchmark.interleaved_medians`: the machine's drift spreads over all of them) and each reports the
median of --repeats calls with `block_until_ready`. Ratios are
relative to the dense SwiGLU FFN whose hidden width is top_k * expert_ff (the same active FLOPs per token). Every row
also gives its achieved rate of *useful* FLOPs (`benchmark.ffn_flops` / `hmoe_flops`; x3 for forward + backward, the
usual count) and that rate as a fraction of one `[T, D] x [D, K F]` float32 matmul timed in the same process: the
distance to this machine's limit; "dropped" is the fraction of assignments over capacity on this input (routers at
initialisation, so close to uniform routing: the drops the group size alone causes). `einsum_gN` is the GShard
one-hot einsum with routing groups of N tokens (as GShard runs it: the one-hot dispatch costs O(T E C D) with C
proportional to the group size, so smaller groups are cheaper and drop more), `einsum` one group of all T.
"""

import jax
from absl import app, flags

from experiments.benchmark import (
  ffn_flops,
  format_table,
  hmoe_flops,
  interleaved_medians,
  layer_call,
  malloc_setting,
  matmul_call,
)
from hmoe.config import HMoEConfig, MoEConfig
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.model.layers import DenseFeedForward
from hmoe.model.moe import MoEFeedForward

_TOKENS = flags.DEFINE_list("tokens", ["2048", "8192"], "Token counts (one routing group).")
_EXPERTS = flags.DEFINE_list("experts", ["8", "16", "32"], "Expert counts.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width D.")
_EXPERT_FF = flags.DEFINE_list("expert_ff", ["1024"], "Expert hidden widths F.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_PATHS = flags.DEFINE_list("paths", ["sort", "dropless", "einsum"],
                           "Variants: sort, dropless, einsum, einsum_gN (standard MoE; N tokens per routing group); "
                           "hmoeM (hierarchical, M experts per cluster, top-1 cluster, top-K experts inside, rank "
                           "--rank).")
_RANK = flags.DEFINE_integer("rank", 16, "Residual rank R of the hmoe variants.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant (median reported).")
_BACKWARD = flags.DEFINE_bool("backward", False, "Time forward + backward instead of forward only.")


def _layer(path: str, num_experts: int, num_tokens: int, hidden: int):
  if path.startswith("einsum_g"):
    group = int(path[len("einsum_g"):])
    return MoEFeedForward(MoEConfig(num_experts=num_experts, top_k=_TOP_K.value, expert_ff=hidden,
                                    dispatch="einsum", num_groups=max(1, num_tokens // group)))
  if path.startswith("hmoe"):
    members = int(path[len("hmoe"):])
    return HMoEFeedForward(HMoEConfig(num_experts=num_experts, num_clusters=num_experts // members,
                                      rank=_RANK.value, top_k_clusters=1, top_k_experts=_TOP_K.value,
                                      expert_ff=hidden))
  return MoEFeedForward(MoEConfig(num_experts=num_experts, top_k=_TOP_K.value, expert_ff=hidden,
                                  dispatch="einsum" if path == "einsum" else "sort", dropless=path == "dropless"))


def _dropped_fraction(module, x: jax.Array) -> float:
  """Fraction of this input's (token, expert) assignments dropped for capacity, with the parameters `layer_call`
  initialises (seed 0): smaller routing groups make the einsum path cheaper but drop more."""
  params = jax.jit(lambda x: module.init(jax.random.PRNGKey(0), x, train=True))(x)
  stats = jax.jit(lambda p, x: module.apply(p, x, train=True)[1])(params, x)
  return float(stats.num_dropped) / max(1, int(stats.num_assignments))


def _label_and_flops(path: str, num_tokens: int, width: int, hidden: int) -> tuple[str, float]:
  if path.startswith("hmoe"):
    return (f"HMoE M={path[len('hmoe'):]} R={_RANK.value}",
            hmoe_flops(num_tokens, width, hidden, _RANK.value, 1, _TOP_K.value))
  return f"MoE {path}", ffn_flops(num_tokens, width, hidden, _TOP_K.value)


def main(argv):
  del argv
  rows = []
  width, top_k = _D_MODEL.value, _TOP_K.value
  passes = 3 if _BACKWARD.value else 1
  columns = ["tokens", "F", "experts", "variant", "ms", "tokens/s", "time vs dense", "GFLOP/s", "of matmul",
             "dropped"]
  for num_tokens in map(int, _TOKENS.value):
    x = jax.random.normal(jax.random.PRNGKey(1), (1, num_tokens, width))
    for hidden in map(int, _EXPERT_FF.value):
      # (experts, label, useful forward FLOPs) -> call; all of one (T, F) are timed round-robin, with the reference.
      variants = {("-", "matmul", 2.0 * num_tokens * width * top_k * hidden): matmul_call(num_tokens, width,
                                                                                          top_k * hidden),
                  ("-", "dense FFN", ffn_flops(num_tokens, width, top_k * hidden)):
                      layer_call(DenseFeedForward(top_k * hidden), x, backward=_BACKWARD.value)}
      dropped = {}
      for num_experts in map(int, _EXPERTS.value):
        for path in _PATHS.value:
          label, flops = _label_and_flops(path, num_tokens, width, hidden)
          layer = _layer(path, num_experts, num_tokens, hidden)
          variants[(num_experts, label, flops)] = layer_call(layer, x, backward=_BACKWARD.value, train=True)
          dropped[(num_experts, label, flops)] = _dropped_fraction(layer, x)
      reference = next(iter(variants))
      seconds = interleaved_medians(variants, repeats=_REPEATS.value, rewarm=[reference])
      matmul_flops, matmul_s = reference[2], seconds[reference]
      peak = matmul_flops / matmul_s / 1e9  # The matmul is counted once: it has no backward here.
      dense_s = seconds[next(key for key in seconds if key[1] == "dense FFN")]
      rows.append({"tokens": num_tokens, "F": hidden, "experts": "-",
                   "variant": f"matmul [T,{width}]x[{width},{top_k * hidden}]", "GFLOP/s": peak, "of matmul": 1.0})
      for (experts, label, flops), variant_s in list(seconds.items())[1:]:
        rate = passes * flops / variant_s / 1e9
        rows.append({"tokens": num_tokens, "F": hidden, "experts": experts, "variant": label, "ms": variant_s * 1e3,
                     "tokens/s": num_tokens / variant_s, "time vs dense": variant_s / dense_s, "GFLOP/s": rate,
                     "of matmul": rate / peak, "dropped": dropped.get((experts, label, flops))})
      print(format_table(rows[-len(variants):], columns), flush=True)
  mode = "forward+backward" if _BACKWARD.value else "forward"
  print(f"\n{mode}, D={_D_MODEL.value}, top-{_TOP_K.value}, capacity factor 1.25, "
        f"{jax.devices()[0].platform}, median of {_REPEATS.value}, variants timed round-robin, {malloc_setting()}\n")
  print(format_table(rows, columns))


if __name__ == "__main__":
  app.run(main)
