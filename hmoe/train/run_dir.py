"""A run directory's identity and ownership: one process at a time, one config, no silent overwrite.

- `RunLock`: `<workdir>/.lock` created exclusively (`O_EXCL`) with the holder's pid, host and start time; a second
  process stops with a message naming the holder before it writes anything. A lock whose process no longer runs on
  this host is stale and taken over (with a warning).
- `reconcile_config`: `config.json` is written when a run starts fresh. A resume compares the requested config with
  the saved one and refuses any difference (one message naming every differing field) unless each differing field is
  in `allow_changes` *and* is one that cannot change what the checkpoints mean (`SAFE_TO_CHANGE`); accepted changes are
  logged, recorded in `config_history.jsonl`, and `config.json` is rewritten to describe the run from then on.
- `truncate_metrics`: a resumed run drops the metrics lines written after the step it resumes from, so
  `metrics.jsonl` has one line per logged step across resumes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import socket
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from hmoe.config import ExperimentConfig

# Fields a resume may change (when asked to): they shape the optimisation or the bookkeeping from now on, not what the
# saved parameters, moments, routing state or data position mean. Model shapes, data, tokenizer and seed are not here.
SAFE_TO_CHANGE = frozenset({
    "train.num_steps", "train.learning_rate", "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay",
    "train.grad_clip_norm", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.mesh_shape", "data.eval_batch_size", "data.eval_splits", "data.data_dir",
})


class RunDirectoryError(RuntimeError):
  """A run directory cannot be used as asked (locked, or holding a run with another config)."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def config_as_json(config: ExperimentConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))


def config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`{dotted field: (saved value, requested value)}` for every field that differs (missing = None)."""
  old, new = _flatten(saved), _flatten(requested)
  return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def write_json_atomic(path: pathlib.Path, value: Any) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as stream:
      stream.write(json.dumps(value, indent=2))
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a config is for everyone who reads the run.
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def reconcile_config(workdir: pathlib.Path, config: ExperimentConfig, *, resuming: bool,
                     allow_changes: Iterable[str] = (), step: int = 0) -> None:
  """Writes `config.json` for a fresh run; for a resume, checks the requested config against it (module docstring)."""
  path = workdir / "config.json"
  requested = config_as_json(config)
  if not resuming or not path.exists():
    write_json_atomic(path, requested)
    return
  differences = config_differences(json.loads(path.read_text()), requested)
  if not differences:
    return
  allowed = set(allow_changes)
  refused = {key: change for key, change in differences.items() if key not in allowed or key not in SAFE_TO_CHANGE}
  if refused:
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
    unsafe = sorted(set(refused) - SAFE_TO_CHANGE)
    hint = (f"{', '.join(unsafe)} would change what its checkpoints mean: use a new workdir" if unsafe else
            f"to resume with these changes pass --allow_config_change={','.join(refused)}")
    raise RunDirectoryError(f"{workdir} holds a run with another config ({listed}); {hint}.")
  for key, (old, new) in differences.items():
    logging.warning("resuming %s at step %d with %s changed: %r -> %r", workdir, step, key, old, new)
  with (workdir / "config_history.jsonl").open("a") as stream:
    stream.write(json.dumps({"step": step, "changes": {key: list(change) for key, change in differences.items()}})
                 + "\n")
  write_json_atomic(path, requested)


def truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Drops the lines of `path` (JSON lines with a "step") logged after `step`: a resume rewrites them."""
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)

  def keep(line: str) -> bool:
    try:
      return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
      return False  # A line cut short by a kill mid-write.

  kept = [line if line.endswith("\n") else line + "\n" for line in lines if keep(line)]
  if len(kept) != len(lines):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as stream:
      stream.writelines(kept)
    os.replace(tmp, path)


def check_writable(directory: pathlib.Path) -> None:
  """Fails now, not at the first checkpoint, if `directory` cannot be written."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write_probe.")
  except OSError as error:
    raise RunDirectoryError(f"{directory} is not writable ({error.strerror})") from None
  os.close(fd)
  os.unlink(probe)


def _process_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Exists, owned by someone else.
  return True


class RunLock:
  """Exclusive ownership of a run directory for the lifetime of a `with` block."""

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / ".lock"

  def __enter__(self) -> RunLock:
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        if not self._remove_if_stale():
          other = self._holder()
          raise RunDirectoryError(
              f"{self.path.parent} is in use by pid {other.get('pid')} on {other.get('host')} since "
              f"{other.get('since')}; wait for it to finish or use another workdir "
              f"(if that process is gone, delete {self.path})") from None
        continue
      with os.fdopen(fd, "w") as stream:
        stream.write(json.dumps(holder))
      return self
    raise RunDirectoryError(f"could not take the lock {self.path}")

  def __exit__(self, *exc_info) -> None:
    if self._holder().get("pid") == os.getpid():
      self.path.unlink(missing_ok=True)

  def _holder(self) -> dict[str, Any]:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}

  def _remove_if_stale(self) -> bool:
    holder = self._holder()
    if holder.get("host") == socket.gethostname() and not _process_running(int(holder.get("pid", -1))):
      logging.warning("removing the stale lock %s of pid %s (no longer running)", self.path, holder.get("pid"))
      self.path.unlink(missing_ok=True)
      return True
    return False
