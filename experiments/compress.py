"""Exports a trained run in compressed storage and prints its bytes by component against float32.

  python -m experiments.compress --workdir=runs/compare/hmoe8x4 --out=runs/compressed/hmoe8x4
  python -m experiments.evaluate --workdir=runs/compressed/hmoe8x4     # perplexity of the compressed model
  python -m experiments.generate --workdir=runs/compressed/hmoe8x4 --prompt="The city of"

HMoE bases in --base_dtype, residual factors (and standard MoE experts with --expert_format=int4) in packed INT4 with
16-bit scales per --group_size input rows, routers in float32, the rest in --trunk_dtype (`hmoe.inference.storage`).
The run's directory is only read; --out must not exist.
"""

import json
import sys

from absl import app, flags

from hmoe.inference import storage
from hmoe.inference.run import load_run
from hmoe.train.loop import USER_ERRORS, quiet_library_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory.")
_OUT = flags.DEFINE_string("out", None, "New directory for the compressed export.")
_BASE_DTYPE = flags.DEFINE_enum("base_dtype", "bfloat16", ["bfloat16", "float16"], "HMoE bases.")
_EXPERT_FORMAT = flags.DEFINE_enum("expert_format", "int4", ["int4", "bfloat16", "float16"], "Standard MoE experts.")
_TRUNK_DTYPE = flags.DEFINE_enum("trunk_dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                                 "Attention, embeddings, dense FFNs, shared experts.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 64, "INT4 scale group along the input dimension.")

flags.mark_flags_as_required(["workdir", "out"])


def run(workdir: str, out: str, config: storage.StorageConfig) -> dict[str, dict[str, int]]:
  loaded = load_run(workdir)
  model_config = loaded.config.model
  compressed = storage.compress(loaded.params, model_config, config)
  storage.save(out, compressed, loaded.routing_state, loaded.config, config, step=loaded.step,
               extra_files={"tokenizer.json": loaded.workdir / "tokenizer.json"})
  return {"float32": storage.bytes_by_component(loaded.params, model_config),
          "compressed": storage.bytes_by_component(compressed, model_config)}


def main(argv):
  del argv
  quiet_library_logging()
  config = storage.StorageConfig(base_dtype=_BASE_DTYPE.value, expert_format=_EXPERT_FORMAT.value,
                                 trunk_dtype=_TRUNK_DTYPE.value, group_size=_GROUP_SIZE.value)
  try:
    print(json.dumps(run(_WORKDIR.value, _OUT.value, config), indent=2))
  except (*USER_ERRORS, FileExistsError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
