"""Bytes by component of config variants in float32, 16-bit and compressed storage, from shapes alone (no training).

  python -m experiments.storage_table --config=experiments/configs/compare.py --variants=dense,moe,hmoe8x4,hmoe4x8
  python -m experiments.storage_table --config=experiments/configs/narrow.py --variants=dense,moe

Compressed = `hmoe.inference.storage` defaults (HMoE bases bf16, residual factors and standard MoE experts INT4 with
fp16 scales per 64 input rows, routers float32, the rest bf16). "16-bit" stores every matrix in bf16 (routers and
norms float32). Sizes in MiB.
"""

import functools

import jax
from absl import app, flags

from experiments.benchmark import format_table, load_variant_config
from hmoe.inference import storage
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import TransformerLM
from hmoe.train.optimizer import make_optimizer
from hmoe.train.state import init_train_state

_CONFIG = flags.DEFINE_string("config", "experiments/configs/compare.py", "Config file with get_config(variant).")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "moe", "hmoe8x4", "hmoe4x8"], "Variants.")

_FORMATS = {"16-bit": storage.StorageConfig(expert_format="bfloat16"), "compressed": storage.StorageConfig()}
_COMPONENTS = ("expert", "base", "residual", "router", "trunk", "norm", "total")


def variant_rows(config) -> list[dict]:
  model_config = config.model
  state = jax.eval_shape(functools.partial(init_train_state, TransformerLM(model_config), make_optimizer(config.train),
                                           config))
  counts = parameter_counts(state.params, model_config)
  trees = {"float32": state.params}
  for name, storage_config in _FORMATS.items():
    if model_config.routed_kind != "hmoe" or name != "16-bit":
      trees[name] = jax.eval_shape(lambda p, c=storage_config: storage.compress(p, model_config, c), state.params)
    else:  # The HMoE's 16-bit variant: residual factors in bf16 too (routers and norms stay float32).
      sixteen = lambda path, leaf: jax.ShapeDtypeStruct(
          leaf.shape, "bfloat16" if leaf.ndim > 1 and "router" not in jax.tree_util.keystr(path) else leaf.dtype)
      trees[name] = jax.tree_util.tree_map_with_path(sixteen, state.params)
  rows = []
  for name, tree in trees.items():
    sizes = storage.bytes_by_component(tree, model_config)
    row = {"format": name, "active params (M)": counts["params_active"] / 1e6,
           "total params (M)": counts["params_total"] / 1e6}
    row.update({component: sizes.get(component, 0) / 2**20 for component in _COMPONENTS})
    rows.append(row)
  return rows


def main(argv):
  del argv
  rows = []
  for variant in _VARIANTS.value:
    rows += [{"variant": variant, **row} for row in variant_rows(load_variant_config(_CONFIG.value, variant))]
  print(f"{_CONFIG.value}: bytes by component (MiB)\n")
  print(format_table(rows, ["variant", "format", "total params (M)", "active params (M)", *_COMPONENTS]))


if __name__ == "__main__":
  app.run(main)
