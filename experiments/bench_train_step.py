"""Full train-step throughput (forward, backward, AdamW) of config variants, in one process.

  python -m experiments.bench_train_step --config=experiments/configs/small.py --variants=dense,moe

Each variant's jitted train step runs on synthetic tokens of the config's batch shape; warm-up excluded, median of
--repeats steps with `block_until_ready`. Reported as tokens/s and time relative to the first variant.
"""

import functools

from absl import app, flags
import jax
import numpy as np

from hmoe.benchmark import format_table, median_seconds
from hmoe.config import from_config_dict
from hmoe.model import TransformerLM
from hmoe.step import init_train_state, make_optimizer, train_step

_CONFIG = flags.DEFINE_string("config", "experiments/configs/small.py", "Config file with get_config(variant).")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "moe"], "Variants passed to get_config.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant (median reported).")


def _load_config(path: str, variant: str):
  namespace = {}
  exec(compile(open(path).read(), path, "exec"), namespace)  # The same files the trainer reads.
  return from_config_dict(namespace["get_config"](variant))


def main(argv):
  del argv
  rows = []
  for variant in _VARIANTS.value:
    config = _load_config(_CONFIG.value, variant)
    model, optimizer = TransformerLM(config.model), make_optimizer(config.train)
    state = jax.jit(functools.partial(init_train_state, model, optimizer, config))()
    rng = np.random.default_rng(0)
    shape = (config.data.batch_size, config.data.seq_len)
    batch = {"inputs": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
             "targets": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)}
    step_fn = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, config=config))
    # The state is not donated, so every timed call starts from the same state.
    seconds = median_seconds(lambda s, b: step_fn(s, b)[1]["loss"], state, batch, repeats=_REPEATS.value)
    tokens = shape[0] * shape[1]
    rows.append({"variant": variant, "ms/step": seconds * 1e3, "tokens/s": tokens / seconds})
  for row in rows:
    row["time vs " + rows[0]["variant"]] = row["ms/step"] / rows[0]["ms/step"]
  print(f"\ntrain step, {_CONFIG.value}, {jax.devices()[0].platform}, median of {_REPEATS.value}\n")
  print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
  app.run(main)
