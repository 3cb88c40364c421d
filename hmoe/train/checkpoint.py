"""Atomic, rotating checkpoints of the whole `TrainState` with orbax, and restore that survives a corrupt latest step.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact. If the newest checkpoint cannot be read (a disk error, a hand-edited file), `restore`
says so by name and falls back to the next older one instead of discarding the run.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored."""


class LegacyCheckpointError(CheckpointError):
  """A checkpoint written with a train-state layout this version cannot read."""


# TrainState fields of the layout before `routing_state` (2026-12): clustering statistics and MoE balancing biases.
_LEGACY_FIELDS = ("cluster_state", "moe_selection_bias")


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
      except LegacyCheckpointError:
        raise  # Every older checkpoint of the run has the same layout: falling back would not help.
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
    except ValueError as error:
      on_disk = set(self._manager.item_metadata(step).keys())
      legacy = sorted(on_disk & set(_LEGACY_FIELDS))
      if legacy:
        raise LegacyCheckpointError(
            f"checkpoint {self.directory / str(step)} has the train-state layout of hmoe before 2026-12 "
            f"({', '.join(legacy)}; now one `routing_state`, and the HMoE router kernel moved from `hmoe/router` to "
            f"`hmoe/router/kernel`). Resume it with that version of hmoe, or start a new run.") from error
      raise

  def close(self) -> None:
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete or abstract state, the target structure for `restore`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
