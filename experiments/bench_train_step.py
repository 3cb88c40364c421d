"""Full train-step throughput (forward, backward, AdamW) of config variants, in one process.

  python -m experiments.bench_train_step --config=experiments/configs/small.py --variants=dense,moe

Each variant's jitted train step runs on synthetic tokens of the config's batch shape; warm-up excluded, median of
--repeats steps with `block_until_ready`. Reported as tokens/s and time relative to the first variant.
"""

import jax
from absl import app, flags

from experiments.benchmark import format_table, load_variant_config, train_step_seconds

_CONFIG = flags.DEFINE_string("config", "experiments/configs/small.py", "Config file with get_config(variant).")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "moe"], "Variants passed to get_config.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant (median reported).")


def main(argv):
  del argv
  rows = []
  for variant in _VARIANTS.value:
    config = load_variant_config(_CONFIG.value, variant)
    seconds = train_step_seconds(config, repeats=_REPEATS.value)
    shape = (config.data.batch_size, config.data.seq_len)
    tokens = shape[0] * shape[1]
    rows.append({"variant": variant, "ms/step": seconds * 1e3, "tokens/s": tokens / seconds})
  for row in rows:
    row["time vs " + rows[0]["variant"]] = row["ms/step"] / rows[0]["ms/step"]
  print(f"\ntrain step, {_CONFIG.value}, {jax.devices()[0].platform}, median of {_REPEATS.value}\n")
  print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
  app.run(main)
