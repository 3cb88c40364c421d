"""Config validation: bad values fail with a message naming them, before anything compiles."""

import pytest

from experiments.configs import narrow, small, tiny
from hmoe.config import from_config_dict


def _tiny(**overrides):
  raw = tiny.get_config().to_dict()
  for dotted, value in overrides.items():
    section, *path = dotted.split("__")
    target = raw[section]
    for key in path[:-1]:
      target = target[key]
    target[path[-1]] = value
  return raw


@pytest.mark.parametrize("overrides, message", [
    ({"model__moe__top_k": 5}, "moe.top_k=5"),
    ({"model__num_heads": 3}, "num_heads=3 must divide model.d_model=32"),
    ({"model__ffn_pattern": "dense,mixture"}, "unknown kinds ['mixture']"),
    ({"model__dtype": "float16"}, "model.dtype='float16'"),
    ({"model__moe__capacity_factor": 0.0}, "moe.capacity_factor must be > 0"),
    ({"model__moe__dispatch": "ragged"}, "moe.dispatch='ragged'"),
    ({"data__seq_len": 64}, "data.seq_len=64 exceeds model.max_len=32"),
    ({"data__dataset": "ptb"}, "data.dataset='ptb'"),
    ({"train__warmup_steps": 100}, "train.warmup_steps=100"),
    ({"train__warmup_steps": 6}, "train.warmup_steps=6 must be in [0, num_steps=6)"),  # No step left to decay.
    ({"model__dropout_rate": 1.0}, "model.dropout_rate must be in [0, 1)"),
    ({"train__learning_rate": -1.0}, "train.learning_rate must be > 0"),
    ({"model__moe__num_groups": 3}, "moe.num_groups=3 must divide"),
    ({"model__moe__typo_field": 1}, "model.moe.typo_field"),
    ({"train__mesh_shape": (-1, -1, 1)}, "train.mesh_shape"),
    ({"train__fan_in_lr_base": -1}, "train.fan_in_lr_base must be >= 0"),
    ({"model__moe__bias_update_rate": -0.001}, "moe.bias_update_rate must be >= 0"),
    ({"model__moe__routed_scale": 0.0}, "moe.routed_scale must be > 0"),
    # Non-finite and out-of-range values that range checks alone let through (they failed late before).
    ({"model__moe__capacity_factor": float("inf")}, "model.moe.capacity_factor must be finite, got inf"),
    ({"train__learning_rate": float("inf")}, "train.learning_rate must be finite, got inf"),
    ({"train__weight_decay": float("nan")}, "train.weight_decay must be finite, got nan"),
    ({"train__seed": -1}, "train.seed must be an int >= 0, got -1"),
    ({"model__ffn_pattern": "dense,hmoe", "model__hmoe__num_experts": 4, "model__hmoe__num_clusters": 2,
      "model__hmoe__expert_ff": 64, "model__hmoe__rank": 40}, "hmoe.rank=40 must be <= min(model.d_model=32"),
    ({"model__ffn_pattern": "dense,hmoe", "model__hmoe__router_jitter": 1.5}, "hmoe.router_jitter must be in [0, 1)"),
])
def test_invalid_values_are_named(overrides, message):
  with pytest.raises(ValueError) as error:
    from_config_dict(_tiny(**overrides))
  assert message in str(error.value)


def test_shipped_configs_are_valid():
  assert from_config_dict(tiny.get_config()).model.num_routed_layers == 1
  assert [from_config_dict(tiny.get_config(v)).model.routed_kind for v in tiny.VARIANTS] == ["moe", None, "hmoe"]
  with pytest.raises(ValueError, match=r"tiny config variant must be one of \('moe', 'dense', 'hmoe'\)"):
    tiny.get_config("sparse")
  # The narrow HMoE keeps the MoE's active width and 32 routed experts, with 75% fewer routed-expert parameters.
  narrow_hmoe = from_config_dict(narrow.get_config("hmoe")).model
  assert narrow_hmoe.shared_expert_ff + narrow_hmoe.hmoe.top_k_experts * narrow_hmoe.hmoe.expert_ff == narrow_hmoe.d_ff
  assert narrow_hmoe.hmoe.num_experts == 32 and narrow_hmoe.hmoe.similarity_signal == "router"
  assert from_config_dict(small.get_config("moe")).model.ffn_kinds == ("moe",) * 4
  assert from_config_dict(small.get_config("dense")).model.num_routed_layers == 0
  # Every MoE variant has the same active FFN width as its dense baseline.
  for module, variant in ((small, "moe"), (small, "moe_shared"), (narrow, "moe")):
    model = from_config_dict(module.get_config(variant)).model
    assert model.shared_expert_ff + model.moe.top_k * model.moe.expert_ff == model.d_ff, variant
  assert from_config_dict(narrow.get_config("dense")).model.d_ff == 256
  # Fan-in lr scaling is anchored at the dense width, so it leaves the dense baseline's optimizer unchanged.
  for module in (small, narrow):
    for variant in module.VARIANTS:
      config = from_config_dict(module.get_config(variant))
      assert config.train.fan_in_lr_base == config.model.d_ff, variant
    with pytest.raises(ValueError, match="variant"):
      module.get_config("sparse")


def test_moe_fields_ignored_for_dense_models():
  # An all-dense model does not validate (or need) MoE settings.
  from_config_dict(_tiny(model__ffn_pattern="dense", model__moe__top_k=99))


def test_every_config_file_documents_its_variants_and_names_them_on_a_typo():
  import importlib
  import pathlib as pathlib_
  import re

  files = sorted(path.stem for path in (pathlib_.Path(__file__).parents[1] / "experiments" / "configs").glob("*.py")
                 if path.stem != "__init__")
  assert {"tiny", "small", "narrow", "quickstart", "compare", "pod", "glue"} <= set(files)
  for name in files:
    module = importlib.import_module(f"experiments.configs.{name}")
    for variant in module.VARIANTS:
      assert re.search(rf"\b{variant}\b", module.__doc__), (name, variant)  # Listed in the docstring.
      module.get_config(variant)
    with pytest.raises(ValueError, match=rf"{name} config variant must be one of \({module.VARIANTS[0]!r}"):
      module.get_config("no_such_variant")


def test_importing_hmoe_turns_off_the_xla_cpu_scheduler_that_deadlocks_the_regroup():
  import os

  import hmoe  # noqa: F401 -- the import sets the flag.

  assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in os.environ["XLA_FLAGS"]
  assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]  # The user's flags are kept.
