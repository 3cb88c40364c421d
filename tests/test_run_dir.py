"""A run directory that cannot be silently corrupted, shared or overwritten (hmoe.train.run_dir and the loop).

One tiny 4-step MoE run per module (`_trained`) is copied for every test that damages or reuses a run directory.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import chex
import jax
import jax.numpy as jnp
import pytest

from experiments import convert_moe
from experiments.configs import tiny
from hmoe.config import from_config_dict
from hmoe.model.transformer import TransformerLM
from hmoe.train import checkpoint, metrics, optimizer as optimizer_lib, run_dir, state as state_lib
from hmoe.train.loop import train_and_evaluate

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(data_dir, **train_overrides):
  raw = tiny.get_config().to_dict()
  raw["data"]["data_dir"] = str(data_dir)
  raw["train"].update(dict(num_steps=4, checkpoint_every=2, keep_checkpoints=3, eval_every=100), **train_overrides)
  return from_config_dict(raw)


@pytest.fixture(scope="module")
def trained(wikitext_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  train_and_evaluate(_config(wikitext_dir), workdir)
  return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "run")
  return tmp_path / "run"


def _snapshot(workdir: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_resume_with_another_config_is_refused_before_anything_is_written(wikitext_dir, run_copy):
  before = _snapshot(run_copy)
  same_shapes = _config(wikitext_dir, learning_rate=1e-3, num_steps=6)
  with pytest.raises(run_dir.RunDirectoryError,
                     match=r"another config \(train.learning_rate: 0.003 -> 0.001; train.num_steps: 4 -> 6\); to "
                           r"resume with these changes pass --allow_config_change=train.learning_rate,train.num_steps"):
    train_and_evaluate(same_shapes, run_copy)
  raw = tiny.get_config().to_dict()
  raw["data"]["data_dir"] = str(wikitext_dir)
  raw["model"]["d_model"] = 48
  raw["train"].update(num_steps=4, checkpoint_every=2, keep_checkpoints=3, eval_every=100)
  with pytest.raises(run_dir.RunDirectoryError, match=r"model.d_model: 32 -> 48.*would change what its checkpoints "
                                                      r"mean: use a new workdir"):
    train_and_evaluate(from_config_dict(raw), run_copy, allow_config_change=["model.d_model"])
  assert _snapshot(run_copy) == before  # Nothing of the earlier run was touched.


def test_an_allowed_safe_change_resumes_and_is_recorded(wikitext_dir, run_copy):
  longer = _config(wikitext_dir, num_steps=6)
  results = train_and_evaluate(longer, run_copy, allow_config_change=["train.num_steps"])
  assert results["step"] == 6
  assert json.loads((run_copy / "config.json").read_text())["train"]["num_steps"] == 6
  (history,) = [json.loads(line) for line in (run_copy / "config_history.jsonl").read_text().splitlines()]
  assert history == {"step": 4, "changes": {"train.num_steps": [4, 6]}}
  # One metrics line per logged step across the resume, in order.
  steps = [r["step"] for r in metrics.read_metrics(run_copy / "metrics.jsonl") if "train/loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 6


def test_metrics_lines_past_the_restored_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (0, 2, 4, 6)) + '{"step": 8, "x')
  run_dir.truncate_metrics(path, 4)
  assert [r["step"] for r in metrics.read_metrics(path)] == [0, 2, 4]


def test_a_second_process_on_a_workdir_stops_before_writing(wikitext_dir, run_copy, tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", (
      "import pathlib, sys, time; from hmoe.train.run_dir import RunLock\n"
      f"with RunLock(pathlib.Path({str(run_copy)!r})):\n  print('locked', flush=True); time.sleep(60)")],
      cwd=_REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _snapshot(run_copy)
    with pytest.raises(run_dir.RunDirectoryError, match=rf"in use by pid {holder.pid} on .*delete .*\.lock"):
      train_and_evaluate(_config(wikitext_dir), run_copy)
    assert _snapshot(run_copy) == before
    # From the command line: one line on stderr, exit status 1, no traceback.
    done = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py",
                           f"--workdir={run_copy}", f"--data_dir={wikitext_dir}"], cwd=_REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 1
    assert f"error: {run_copy} is in use by pid {holder.pid}" in done.stderr
    assert "Traceback" not in done.stderr
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is stale and the next run takes it over.
  assert json.loads((run_copy / ".lock").read_text())["pid"] == holder.pid
  results = train_and_evaluate(_config(wikitext_dir, num_steps=4), run_copy)
  assert results["step"] == 4 and not (run_copy / ".lock").exists()


def test_corrupt_bytes_inside_an_array_fall_back_and_the_final_checkpoint_is_rewritten(wikitext_dir, run_copy):
  config = _config(wikitext_dir)
  array_files = [p for p in (run_copy / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  largest = max(array_files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # Same size: decodes, but the values are wrong.
  largest.write_bytes(bytes(data))
  results = train_and_evaluate(config, run_copy)  # Falls back to step 2, retrains 2 steps, rewrites step 4.
  assert results["step"] == 4
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  abstract = jax.eval_shape(functools.partial(state_lib.init_train_state, model, optimizer, config))
  step, _ = checkpoint.Checkpointer(run_copy / "checkpoints").restore(abstract)
  assert step == 4  # The rewritten step 4 reads and verifies (restore checks every array's digest).


def test_checkpointer_verifies_digests_replaces_failed_steps_and_keeps_exactly_keep(tmp_path, caplog):
  state = {"w": jnp.arange(2000.0), "b": jnp.ones(3)}
  wide = checkpoint.Checkpointer(tmp_path, keep=5)
  for step in (1, 2, 3, 4):
    wide.save(step, jax.tree.map(lambda x, s=step: x * s, state))
  wide.close()
  checkpointer = checkpoint.Checkpointer(tmp_path, keep=2)  # As after a kill between a save and its pruning.
  checkpointer.save(5, state)
  assert checkpointer.all_steps() == [4, 5]
  (tmp_path / "5" / "state" / "_METADATA").unlink()
  step, restored = checkpointer.restore(jax.tree.map(jnp.zeros_like, state))
  assert step == 4
  assert "/5 is unreadable (FileNotFoundError: the metadata of" in caplog.text  # Named, not an AttributeError.
  chex.assert_trees_all_close(restored["w"], state["w"] * 4, atol=0)
  checkpointer.save(5, state)  # The failed step is replaced, not skipped.
  step, restored = checkpointer.restore(jax.tree.map(jnp.zeros_like, state))
  assert step == 5 and checkpointer.all_steps() == [4, 5]
  # Silent corruption: step 5's arrays replaced by other valid ones (they decode fine, orbax cannot tell).
  shutil.rmtree(tmp_path / "5" / "state")
  shutil.copytree(tmp_path / "4" / "state", tmp_path / "5" / "state")
  step, restored = checkpointer.restore(jax.tree.map(jnp.zeros_like, state))
  assert step == 4
  shutil.rmtree(tmp_path / "4" / "state")
  shutil.copytree(tmp_path / "5" / "state", tmp_path / "4" / "state")
  (tmp_path / "4" / "digests" / "metadata").write_text(json.dumps({"['b']": "0" * 64, "['w']": "0" * 64}))
  with pytest.raises(checkpoint.CheckpointError, match=r"/5 is unreadable \(IntegrityError: 2 arrays do not match "
                                                       r"their saved digests(.|\n)*/4 is unreadable \(IntegrityError"):
    checkpointer.restore(jax.tree.map(jnp.zeros_like, state))


def test_convert_refuses_to_write_into_its_own_source(run_copy):
  before = _snapshot(run_copy)
  with pytest.raises(ValueError, match="is the MoE run itself"):
    convert_moe.run(run_copy, run_copy, members=2, rank=4, finetune_steps=1, finetune_lr=1e-3)
  assert _snapshot(run_copy) == before


def test_unwritable_workdir_fails_at_start(wikitext_dir, tmp_path, monkeypatch):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").write_text("not a directory")
  with pytest.raises(run_dir.RunDirectoryError, match=r"run/checkpoints is not writable"):
    train_and_evaluate(_config(wikitext_dir), tmp_path / "run")
  real_mkstemp = tempfile.mkstemp

  def read_only(*args, dir=None, **kwargs):
    if dir is not None and pathlib.Path(dir).name == "checkpoints":
      raise PermissionError(13, "Permission denied")
    return real_mkstemp(*args, dir=dir, **kwargs)

  monkeypatch.setattr(tempfile, "mkstemp", read_only)
  with pytest.raises(run_dir.RunDirectoryError, match=r"run2/checkpoints is not writable \(Permission denied\)"):
    train_and_evaluate(_config(wikitext_dir), tmp_path / "run2")


def test_missing_data_is_named_and_nothing_is_written(tmp_path):
  # Offline (the conftest's mirror does not exist): one paragraph naming the file, the flag, the variable, the command.
  with pytest.raises(FileNotFoundError, match=r"WikiText file .*missing/wikitext-2/wiki.train.tokens is missing and "
                                              r"wikitext-2 could not be downloaded .*--data_dir=DIR.*HMOE_DATA_DIR.*"
                                              r"python -m hmoe.data --download --dataset=wikitext-2"):
    train_and_evaluate(_config(tmp_path / "missing"), tmp_path / "run")
  assert not (tmp_path / "run").exists()
