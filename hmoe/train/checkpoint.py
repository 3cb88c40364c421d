"""Atomic, verified, rotating checkpoints of the whole `TrainState` with orbax.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact. Every checkpoint also stores a SHA-256 digest of each of its arrays, written in the same
atomic step directory, and `restore` recomputes the digests: corrupt bytes that still decode (orbax does not notice a
flipped byte inside an array file) fail verification. A checkpoint that is unreadable or fails verification is named,
and `restore` falls back to the next older one instead of discarding the run; saving that step again replaces it.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored."""


class LegacyCheckpointError(CheckpointError):
  """A checkpoint written with a train-state layout this version cannot read."""


class IntegrityError(CheckpointError):
  """A checkpoint's arrays do not match the digests written with them."""


# TrainState fields of the layout before `routing_state` (2026-12): clustering statistics and MoE balancing biases.
_LEGACY_FIELDS = ("cluster_state", "moe_selection_bias")


def array_digests(tree: Any) -> dict[str, str]:
  """SHA-256 of every array leaf (dtype, shape and bytes), keyed by its path in the tree."""
  digests = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    array = np.asarray(jax.device_get(leaf))
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    digests[jax.tree_util.keystr(path)] = digest.hexdigest()
  return digests


class Checkpointer:
  """Keeps the newest `keep` checkpoints of a train state under `directory`."""

  def __init__(self, directory: str | pathlib.Path, keep: int = 3):
    self.directory = pathlib.Path(directory).resolve()
    self.keep = keep
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Named items: the state (its tree readable by `item_metadata`) and the digests that verify it.
        item_handlers={"state": ocp.StandardCheckpointHandler(), "digests": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
    )
    self._failed_steps: set[int] = set()  # Steps found unreadable or corrupt by `restore`: `save` replaces them.

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    """Saves `state` as `step` (a no-op if a verified checkpoint of that step exists) and keeps the newest `keep`."""
    if step in self._manager.all_steps():
      if step not in self._failed_steps:
        return
      logging.warning("replacing checkpoint %s, which failed to restore", self.directory / str(step))
      self._manager.delete(step)
      self._failed_steps.discard(step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), digests=ocp.args.JsonSave(array_digests(state)))
    self._manager.save(step, args=args, force=force)
    self._manager.wait_until_finished()
    # Orbax prunes at save time; a run killed between a save and its pruning leaves extra steps, removed here.
    for old_step in self.all_steps()[:-self.keep]:
      self._manager.delete(old_step)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any] | None:
    """Restores the newest readable, verified checkpoint into the structure/shardings of `abstract_state`.

    Returns (step, state), or None if the directory holds no checkpoint. Raises `CheckpointError` if checkpoints exist
    but none can be read, `LegacyCheckpointError` at once for a train-state layout this version does not read.
    `step`: restore exactly that checkpoint (`CheckpointError` if it is missing or unreadable), e.g. to upcycle a MoE
    from an early step.
    """
    if step is not None and step not in self.all_steps():
      raise CheckpointError(f"{self.directory} has no checkpoint {step}; it has {self.all_steps()}")
    failures = []
    candidates = self.all_steps() if step is None else [step]
    for step in reversed(candidates):  # noqa: B020 -- `step` is read above, before the loop rebinds it.
      try:
        state = self._restore_step(step, abstract_state)
      except LegacyCheckpointError:
        raise  # Every older checkpoint of the run has the same layout: falling back would not help.
      except Exception as error:  # Orbax raises many types (ValueError, FileNotFoundError, tensorstore errors).
        message = f"checkpoint {self.directory / str(step)} is unreadable ({type(error).__name__}: {error})"
        logging.error("%s; trying an older checkpoint.", message.split("\n")[0])
        failures.append(message)
        self._failed_steps.add(step)
        continue
      if failures:
        logging.warning("Resumed from step %d because newer checkpoints were unreadable: %s", step,
                        [failure.split("\n")[0] for failure in failures])
      return step, state
    if failures:
      raise CheckpointError("no readable checkpoint in " + str(self.directory) + ":\n  " + "\n  ".join(failures))
    return None

  def _restore_step(self, step: int, abstract_state: Any) -> Any:
    self._check_layout(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), digests=ocp.args.JsonRestore()))
    expected, actual = restored["digests"], array_digests(restored["state"])
    if expected != actual:
      bad = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
      raise IntegrityError(f"{len(bad)} arrays do not match their saved digests, e.g. {bad[:3]}")
    return restored["state"]

  def _check_layout(self, step: int) -> None:
    """Names what is missing or outdated before orbax fails with a generic tree mismatch."""
    step_dir = self.directory / str(step)
    if not (step_dir / "digests").exists():
      if (step_dir / "default").exists():
        raise LegacyCheckpointError(
            f"checkpoint {step_dir} was written by hmoe before 2026-12 (no array digests; its train state had "
            f"{'/'.join(_LEGACY_FIELDS)} where it now has `routing_state`, and the HMoE router kernel moved from "
            f"`hmoe/router` to `hmoe/router/kernel`). Resume it with that version of hmoe, or start a new run.")
      raise FileNotFoundError(f"{step_dir / 'digests'} is missing")
    metadata = self._manager.item_metadata(step)
    if metadata is None or metadata.get("state") is None:
      raise FileNotFoundError(f"the metadata of {step_dir / 'state'} is missing or unreadable")

  def close(self) -> None:
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete or abstract state, the target structure for `restore`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
