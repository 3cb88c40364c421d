"""The training loop: data, sharded state, resume, jitted steps, logging, evaluation and checkpoints.

Read top to bottom: each section of `train_and_evaluate` is one phase of a run. Everything the loop needs to continue
exactly after an interruption (params, optimizer moments, routing state, step = data position, RNG) is inside the
checkpointed `TrainState`; the tokenizer and encoded splits are cached in the workdir.
"""

from __future__ import annotations

import functools
import logging as std_logging
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from hmoe.config import ExperimentConfig
from hmoe.data import batching
from hmoe.data.corpus import load_corpus, split_paths
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import TransformerLM
from hmoe.parallel import expert_parallel, sharding
from hmoe.train import checkpoint, metrics, optimizer as optimizer_lib, run_dir, state as state_lib, step as step_lib
from hmoe.train.evaluation import evaluate

# Errors a user fixes by changing the command (a config value, the data, the workdir, the learning rate): entry points
# report them as one line and exit with status 1 instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, run_dir.RunDirectoryError, checkpoint.CheckpointError, FloatingPointError)


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the console; its warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def quiet_library_logging() -> None:
  """For entry points: filter third-party INFO chatter from the absl console handler."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def _summarise_train_metrics(history: list[dict[str, jax.Array]], tokens: int, seconds: float) -> dict[str, Any]:
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
  summary = {key: float(np.mean(value)) for key, value in stacked.items()
             if key not in ("expert_load", "cluster_load", "num_dropped", "num_assignments")}
  summary["perplexity"] = metrics.perplexity(summary["ce_loss"], 1.0)
  summary["tokens_per_second"] = tokens / seconds
  if "expert_load" in stacked:
    load_LxE = stacked["expert_load"].mean(axis=0)
    summary.update(metrics.load_balance(load_LxE))
    summary["expert_load"] = load_LxE
    summary["dropped_fraction"] = float(stacked["num_dropped"].sum() / stacked["num_assignments"].sum())
  if "cluster_load" in stacked:
    cluster_load_LxG = stacked["cluster_load"].mean(axis=0)
    summary.update({f"cluster_{key}": value for key, value in metrics.load_balance(cluster_load_LxG).items()})
    summary["cluster_load"] = cluster_load_LxG
  return summary


def _format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "unknown"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _divergence_cause(step_metrics: dict[str, jax.Array]) -> str:
  """What became non-finite at a diverged step: the loss, else the gradient, else the update (e.g. the moments)."""
  values = jax.device_get(step_metrics)
  if not np.isfinite(values["loss"]):
    return "loss"
  return "gradient norm" if not np.isfinite(values["grad_norm"]) else "parameter update"


def train_and_evaluate(config: ExperimentConfig, workdir: str | pathlib.Path, *,
                       warm_start: Callable[[state_lib.TrainState], state_lib.TrainState] | None = None,
                       allow_config_change: Sequence[str] = ()) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns the final evaluation.

  The workdir is locked for the run (`hmoe.train.run_dir.RunLock`); a resume must request the config the run was
  started with, except for the safe fields named in `allow_config_change` (`hmoe.train.run_dir.reconcile_config`).
  `warm_start` maps the freshly initialised state to the one a new run starts from (for example converted parameters,
  `experiments/convert_moe.py`). It must keep shapes; a run that resumes from a checkpoint does not call it.
  """
  workdir = pathlib.Path(workdir)
  split_paths(config.data)  # Missing data fails here, before the workdir gets a lock, a config or a checkpoint dir.
  run_dir.check_writable(workdir)
  with run_dir.RunLock(workdir):
    run_dir.check_writable(workdir / "checkpoints")
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    steps = checkpointer.all_steps()
    run_dir.reconcile_config(workdir, config, resuming=bool(steps), allow_changes=allow_config_change,
                             step=steps[-1] if steps else 0)
    try:
      return _train_and_evaluate(config, workdir, checkpointer, warm_start)
    finally:
      checkpointer.close()


def _train_and_evaluate(config: ExperimentConfig, workdir: pathlib.Path, checkpointer: checkpoint.Checkpointer,
                        warm_start: Callable[[state_lib.TrainState], state_lib.TrainState] | None) -> dict[str, Any]:
  train_cfg = config.train

  # ---------------------------------------------------------------- Data.
  corpus = load_corpus(config.data, config.model.vocab_size, workdir)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  logging.info("train split: %d tokens (%d words); %d tokens per step", len(corpus.train.tokens),
               corpus.train.num_words, tokens_per_step)

  # ---------------------------------------------------------------- Model, mesh and sharded state.
  model = TransformerLM(config.model)
  optimizer = optimizer_lib.make_optimizer(train_cfg)
  mesh = sharding.make_mesh(train_cfg.mesh_shape)
  logging.info("devices: %s; mesh %s", jax.devices(), dict(mesh.shape))
  routed = config.model.routed
  if routed is not None and routed.expert_parallel:
    expert_parallel.check_mesh(routed, dict(mesh.shape))  # Before anything compiles.
  abstract_boxed = jax.eval_shape(functools.partial(state_lib.init_boxed_train_state, model, optimizer, config))
  state_sharding = sharding.logical_shardings(abstract_boxed, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    init_fn = jax.jit(functools.partial(state_lib.init_train_state, model, optimizer, config),
                      out_shardings=state_sharding)
    state = init_fn()
  counts = parameter_counts(state.params, config.model)
  logging.info("parameters: %s", counts)

  # ---------------------------------------------------------------- Resume.
  restored = checkpointer.restore(checkpoint.abstract_like(state))
  if restored is not None:
    state = restored[1]
    logging.info("resumed from checkpoint at step %d", restored[0])
  elif warm_start is not None:
    state = jax.device_put(warm_start(state), state_sharding)
    logging.info("warm start at step %d", int(state.step))
  start_step = int(state.step)
  # One metrics line per logged step across resumes: lines past the restored step are logged again.
  run_dir.truncate_metrics(workdir / "metrics.jsonl", start_step if restored is not None else -1)

  # ---------------------------------------------------------------- Compiled steps.
  train_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config),
      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model),
                    in_shardings=(state_sharding.params, state_sharding.routing_state, batch_sharding))
  routed = config.model.routed
  recluster_every = routed.recluster_every if routed is not None and routed.clusters_experts else 0
  recluster_fn = jax.jit(functools.partial(step_lib.recluster_step, optimizer=optimizer, config=config),
                         in_shardings=(state_sharding,), out_shardings=state_sharding, donate_argnums=0)
  writer = metrics.MetricsWriter(workdir / "metrics.jsonl")
  if restored is None:
    writer.write(start_step, {f"model/{key}": value for key, value in counts.items()})

  def run_evals(state, step: int, splits) -> dict[str, dict[str, float]]:
    results = {}
    for split in splits:
      results[split] = evaluate(eval_fn, state.params, state.routing_state, corpus.eval_splits[split], config.data,
                                corpus.tokenizer.eos_id)
      writer.write(step, {f"{split}/{key}": value for key, value in results[split].items()})
      logging.info("step %d %s: loss %.4f, word perplexity %.2f", step, split, results[split]["loss"],
                   results[split]["word_perplexity"])
    return results

  def regroup_and_log(state, step: int):
    """Regroups experts and logs the loss on the next training batch just before and just after."""
    batch = batching.train_batch(corpus.train.tokens, step, config.data.batch_size, config.data.seq_len,
                                 train_cfg.seed)
    batch = {**batch, "weights": np.ones(batch["targets"].shape, np.float32)}
    batch_loss = lambda state: jax.device_get(eval_fn(state.params, state.routing_state, batch))
    before = batch_loss(state)
    state = recluster_fn(state)
    after = batch_loss(state)
    cluster = jax.device_get(state.routing_state.clusters)
    loss_before, loss_after = before["nll_sum"] / before["num_tokens"], after["nll_sum"] / after["num_tokens"]
    writer.write(step, {"regroup/loss_before": loss_before, "regroup/loss_after": loss_after,
                        "regroup/stability": cluster.stability, "regroup/similarity_gain": cluster.similarity_gain,
                        "regroup/adopted": cluster.adopted,
                        # [layers, E]: the original expert at each cluster-major position, so a reader (the
                        # notebook's cluster map) can follow every expert from regroup to regroup.
                        "regroup/expert_id": cluster.expert_id})
    adopted = np.asarray(cluster.adopted)
    message = (f"step {step}: regroup adopted in {int(adopted.sum())}/{adopted.size} layers, experts moved "
               f"{float(np.mean(np.asarray(cluster.stability))):.0%}, batch loss {loss_before:.4f} -> {loss_after:.4f}")
    progress.write(message) if not progress.disable else logging.info("%s", message)
    return state

  def stop_if_diverged(state, history, last_step: int) -> None:
    nan_step = int(state.nan_step)
    if nan_step < 0:
      return
    # `history` holds the metrics of steps last_step - len(history) + 1 .. last_step; those before the bad one are a
    # normal (shorter) logging window, the bad one names the cause.
    first_step = last_step - len(history) + 1
    good = history[:max(nan_step - first_step + 1, 0)]
    if good:
      summary = _summarise_train_metrics(good, len(good) * tokens_per_step, time.perf_counter() - window_start)
      writer.write(nan_step, {f"train/{key}": value for key, value in summary.items()})
    cause = _divergence_cause(history[nan_step - first_step]) if nan_step >= first_step else "loss or update"
    writer.write(nan_step, {"diverged/step": nan_step, "diverged/cause": cause})
    # The frozen state is the last good one; saved without the stop marker, so it resumes (with saner settings).
    checkpointer.save(nan_step, state.replace(nan_step=jnp.full((), -1, jnp.int32)), force=True)
    raise FloatingPointError(
        f"the {cause} became non-finite at step {nan_step}; training stopped. The state from before that step is "
        f"checkpoint {nan_step} in {checkpointer.directory}: rerun with a lower learning rate and "
        f"--allow_config_change=train.learning_rate to continue from it.")

  # ---------------------------------------------------------------- Train.
  history, window_start, window_tokens = [], time.perf_counter(), 0
  # The bar is for terminals; redirected runs get one log line per logging step instead.
  progress = tqdm.tqdm(total=train_cfg.num_steps, initial=start_step, desc="train", unit="step",
                       dynamic_ncols=True, mininterval=5.0, disable=not sys.stderr.isatty())
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    for step in range(start_step, train_cfg.num_steps):
      batch = batching.train_batch(corpus.train.tokens, step, config.data.batch_size, config.data.seq_len,
                                   train_cfg.seed)
      state, step_metrics = train_fn(state, batch)
      history.append(step_metrics)
      window_tokens += tokens_per_step
      progress.update(1)
      done = step + 1
      if step == start_step:
        # The first step of a process compiles: its time would make the first tokens/s reading (and the ETA) wrong.
        jax.block_until_ready(state.step)
        window_start, window_tokens, timed_steps = time.perf_counter(), 0, 0
      else:
        timed_steps += 1
      if done % train_cfg.log_every == 0 or done == train_cfg.num_steps:
        stop_if_diverged(state, history, step)
        seconds = time.perf_counter() - window_start
        summary = _summarise_train_metrics(history, max(window_tokens, 1), max(seconds, 1e-9))
        if not timed_steps:  # Only the compiling step in this window: no honest speed reading.
          summary["tokens_per_second"] = float("nan")
        writer.write(done, {f"train/{key}": value for key, value in summary.items()})
        progress.set_postfix(loss=f"{summary['ce_loss']:.3f}", tok_s=f"{summary['tokens_per_second']:.0f}")
        if progress.disable:
          eta = (train_cfg.num_steps - done) * seconds / timed_steps if timed_steps else float("nan")
          logging.info("step %d/%d: loss %.4f, %.0f tokens/s, ETA %s", done, train_cfg.num_steps, summary["ce_loss"],
                       summary["tokens_per_second"], _format_seconds(eta))
        history, window_tokens, timed_steps = [], 0, 0
      if recluster_every and done % recluster_every == 0 and done != train_cfg.num_steps:
        state = regroup_and_log(state, done)
      if done % train_cfg.eval_every == 0 and done != train_cfg.num_steps:
        run_evals(state, done, ("valid",) if "valid" in corpus.eval_splits else ())
      if done % train_cfg.checkpoint_every == 0 or done == train_cfg.num_steps:
        stop_if_diverged(state, history, step)
        checkpointer.save(done, state)
      if not history:
        window_start = time.perf_counter()
    progress.close()
    stop_if_diverged(state, history, train_cfg.num_steps - 1)
    results = run_evals(state, int(state.step), config.data.eval_splits)
  writer.close()
  return {"step": int(state.step), **counts, **{f"{split}/{key}": value for split, values in results.items()
                                                for key, value in values.items()}}
