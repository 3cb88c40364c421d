"""Checkpoint rotation and re-saves; checkpoints of an old layout or another tree fail with a message naming why."""

import chex
import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
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


def _save_legacy_layout(directory, state, steps) -> None:
  """Writes checkpoints as hmoe did before 2026-12: one unnamed orbax item (`<step>/default`), no digests."""
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                                  options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
  for step in steps:
    manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()


def test_legacy_layout_fails_at_once_naming_the_old_fields(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  _save_legacy_layout(tmp_path, _LegacyState(step=jnp.asarray(3, jnp.int32), params=params,
                                             moe_selection_bias=jnp.zeros(4)), steps=(2, 3))
  target = checkpoint.abstract_like(_State(step=jnp.asarray(0, jnp.int32), params=params,
                                           routing_state={"selection_bias": jnp.zeros(4)}))
  # Named by the newest step: an older checkpoint of the same run has the same layout, so none is tried.
  with pytest.raises(checkpoint.LegacyCheckpointError, match=r"/3 was written by hmoe before 2026-12 .*"
                                                             r"moe_selection_bias.*routing_state"):
    checkpoint.Checkpointer(tmp_path).restore(target)


def test_other_mismatch_is_reported_as_unreadable_with_the_cause(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  _save(tmp_path, _State(step=jnp.asarray(3, jnp.int32), params=params, routing_state={"bias": jnp.zeros(4)}))
  target = checkpoint.abstract_like(_State(step=jnp.asarray(0, jnp.int32), params={"v": jnp.zeros(2)},
                                           routing_state={"bias": jnp.zeros(4)}))
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint.*\n.*/3 is unreadable \(ValueError"):
    checkpoint.Checkpointer(tmp_path).restore(target)


def _step_state(step):
  return _State(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((2, 3), float(step))},
                routing_state={"bias": jnp.arange(4.0) * step})


def test_rotation_keeps_the_newest_two_and_resaving_a_step_is_a_no_op(tmp_path):
  checkpointer = checkpoint.Checkpointer(tmp_path, keep=2)
  for step in (1, 2, 3, 4):
    checkpointer.save(step, _step_state(step))
  assert checkpointer.all_steps() == [3, 4]
  assert sorted(path.name for path in tmp_path.iterdir()) == ["3", "4"]  # Older steps are deleted on disk.
  checkpointer.save(4, _step_state(40))  # Already saved: kept as it was, no error.
  checkpointer.close()
  reopened = checkpoint.Checkpointer(tmp_path, keep=2)
  assert reopened.all_steps() == [3, 4]
  step, state = reopened.restore(checkpoint.abstract_like(_step_state(0)))
  assert step == 4
  chex.assert_trees_all_equal(state, _step_state(4))
  reopened.close()
