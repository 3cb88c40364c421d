"""Atomic, rotating checkpoints of the whole `TrainState` with orbax, and restore that survives a corrupt latest step.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact. If the newest checkpoint cannot be read (a disk error, a hand-edited file), `restore`
says so by name and falls back to the next older one instead of discarding the run.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored."""


class Checkpointer:
  """Keeps the newest `keep` checkpoints of a train state under `directory`."""

  def __init__(self, directory: str | pathlib.Path, keep: int = 3):
    self.directory = pathlib.Path(directory).resolve()
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=ocp.StandardCheckpointHandler(),  # Lets `item_metadata` read a checkpoint's tree.
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint into the structure/shardings of `abstract_state`.

    Returns (step, state), or None if the directory holds no checkpoint. Raises `CheckpointError` if checkpoints exist
    but none can be read.
    """
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        state = self._restore_step(step, abstract_state)
      except Exception as error:  # Orbax raises many types (ValueError, FileNotFoundError, tensorstore errors).
        message = f"checkpoint {self.directory / str(step)} is unreadable ({type(error).__name__}: {error})"
        logging.error("%s; trying an older checkpoint.", message)
        failures.append(message)
        continue
      if failures:
        logging.warning("Resumed from step %d because newer checkpoints were unreadable: %s", step, failures)
      return step, state
    if failures:
      raise CheckpointError("no readable checkpoint in " + str(self.directory) + ":\n  " + "\n  ".join(failures))
    return None

  def _restore_step(self, step: int, abstract_state: Any) -> Any:
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except ValueError:
      # A checkpoint written before an optional state field existed (e.g. `moe_selection_bias`, None unless used)
      # lacks that field's key. Retry without the fields the checkpoint lacks, but only if they are None here:
      # any other mismatch (a missing array, a changed model) still fails.
      if not dataclasses.is_dataclass(abstract_state):
        raise
      on_disk = set(self._manager.item_metadata(step).keys())
      fields = {field.name: getattr(abstract_state, field.name) for field in dataclasses.fields(abstract_state)}
      absent = set(fields) - on_disk
      if not absent or any(fields[name] is not None for name in absent):
        raise
      present = {name: value for name, value in fields.items() if name in on_disk}
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(present))
      logging.info("checkpoint %d predates the state fields %s; they keep their None.", step, sorted(absent))
      return dataclasses.replace(abstract_state, **restored)

  def close(self) -> None:
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete or abstract state, the target structure for `restore`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
