"""Checkpoints written before the state gained an optional field still restore; other mismatches still fail."""

import chex
import flax
import jax
import jax.numpy as jnp
import pytest

from hmoe import checkpoint


@flax.struct.dataclass
class _OldState:
  step: jax.Array
  params: dict


@flax.struct.dataclass
class _NewState:
  step: jax.Array
  params: dict
  selection_bias: jax.Array | None = None  # Added after `_OldState` checkpoints were written; None unless used.


def _save_old(directory) -> _OldState:
  old = _OldState(step=jnp.asarray(3, jnp.int32), params={"w": jnp.arange(6.0).reshape(2, 3)})
  checkpointer = checkpoint.Checkpointer(directory)
  checkpointer.save(3, old)
  checkpointer.close()
  return old


def test_checkpoint_predating_an_optional_field_restores_with_it_none(tmp_path):
  old = _save_old(tmp_path)
  target = checkpoint.abstract_like(_NewState(step=old.step, params=old.params))
  step, state = checkpoint.Checkpointer(tmp_path).restore(target)
  assert step == 3 and isinstance(state, _NewState) and state.selection_bias is None
  chex.assert_trees_all_close(state.params, old.params)
  assert int(state.step) == 3


def test_checkpoint_lacking_a_field_the_run_needs_is_unreadable(tmp_path):
  old = _save_old(tmp_path)
  target = checkpoint.abstract_like(_NewState(step=old.step, params=old.params, selection_bias=jnp.zeros(4)))
  with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
    checkpoint.Checkpointer(tmp_path).restore(target)
