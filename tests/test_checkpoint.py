"""Checkpoints of the train-state layout before `routing_state` fail with a message naming what changed."""

import flax
import jax
import jax.numpy as jnp
import pytest

from hmoe.train import checkpoint


@flax.struct.dataclass
class _LegacyState:
  step: jax.Array
  params: dict
  moe_selection_bias: jax.Array


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  routing_state: dict


def _save(directory, state, steps=(3,)) -> None:
  checkpointer = checkpoint.Checkpointer(directory)
  for step in steps:
    checkpointer.save(step, state)
  checkpointer.close()


def test_legacy_layout_fails_at_once_naming_the_old_fields(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  _save(tmp_path, _LegacyState(step=jnp.asarray(3, jnp.int32), params=params, moe_selection_bias=jnp.zeros(4)),
        steps=(2, 3))
  target = checkpoint.abstract_like(_State(step=jnp.asarray(0, jnp.int32), params=params,
                                           routing_state={"selection_bias": jnp.zeros(4)}))
  with pytest.raises(checkpoint.LegacyCheckpointError, match=r"/3 has the train-state layout .*moe_selection_bias.*"
                                                             r"routing_state"):
    checkpoint.Checkpointer(tmp_path).restore(target)


def test_other_mismatch_is_reported_as_unreadable_with_the_cause(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  _save(tmp_path, _State(step=jnp.asarray(3, jnp.int32), params=params, routing_state={"bias": jnp.zeros(4)}))
  target = checkpoint.abstract_like(_State(step=jnp.asarray(0, jnp.int32), params={"v": jnp.zeros(2)},
                                           routing_state={"bias": jnp.zeros(4)}))
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint.*\n.*/3 is unreadable \(ValueError"):
    checkpoint.Checkpointer(tmp_path).restore(target)
