"""Full train-step throughput (forward, backward, AdamW) of config variants, in one process.

  python -m experiments.bench_train_step --config=experiments/configs/small.py --variants=dense,moe

Each variant's jitted train step runs on synthetic tokens of the config's batch shape; warm-up excluded, the variants
timed round-robin, median of --repeats steps with `block_until_ready`. Reported as tokens/s, time relative to the
first variant, and model FLOPs utilisation: `benchmark.train_flops_per_token` (6 x active parameters + attention) x
tokens/s against one float32 `[tokens, D] x [D, d_ff]` matmul timed in the same process (this machine's practical
peak for such shapes).

Unlike the trainer, the step does not donate its state (every timed call starts from the same one), so each call
allocates a fresh state: under glibc's default malloc that page-faults through it and makes the timings swing
(MoE / HMoE 8 x 4 0.92-1.19x in five runs of one day); `experiments.train`'s logged tokens/s is the steadier
reading, and `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` the steadier setting (docs/speed.md, 2026-12-04).
"""


import jax
from absl import app, flags

from experiments.benchmark import (
  format_table,
  interleaved_medians,
  load_variant_config,
  malloc_setting,
  matmul_call,
  train_flops_per_token,
  train_step_call,
)
from hmoe.model.param_counts import model_parameter_counts

_CONFIG = flags.DEFINE_string("config", "experiments/configs/small.py", "Config file with get_config(variant).")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "moe"], "Variants passed to get_config.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant (median reported).")


def main(argv):
  del argv
  configs = {variant: load_variant_config(_CONFIG.value, variant) for variant in _VARIANTS.value}
  first = next(iter(configs.values()))
  tokens = first.data.batch_size * first.data.seq_len
  if any(c.data.batch_size * c.data.seq_len != tokens for c in configs.values()):
    raise app.UsageError("the variants must train on batches of the same size")
  # Every variant and the reference matmul timed round-robin (`benchmark.interleaved_medians`), so the machine's
  # drift does not end up in the ratios.
  calls = {"matmul": matmul_call(tokens, first.model.d_model, first.model.d_ff)}
  calls.update({variant: train_step_call(config) for variant, config in configs.items()})
  seconds = interleaved_medians(calls, repeats=_REPEATS.value, rewarm=["matmul"])
  peak = 2.0 * tokens * first.model.d_model * first.model.d_ff / seconds.pop("matmul") / 1e9
  rows = []
  for variant, config in configs.items():
    active = model_parameter_counts(config.model)["params_active"]
    model_gflops = train_flops_per_token(active, config.model) * tokens / seconds[variant] / 1e9
    rows.append({"variant": variant, "ms/step": seconds[variant] * 1e3, "tokens/s": tokens / seconds[variant],
                 "model GFLOP/s": model_gflops, "MFU vs matmul": model_gflops / peak})
  for row in rows:
    row["time vs " + rows[0]["variant"]] = row["ms/step"] / rows[0]["ms/step"]
  print(f"\ntrain step, {_CONFIG.value}, {jax.devices()[0].platform}, median of {_REPEATS.value}, variants timed "
        f"round-robin; in-process matmul peak {peak:.0f} GFLOP/s; {malloc_setting()}\n")
  print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
  app.run(main)
