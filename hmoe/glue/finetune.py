"""Fine-tuning on one GLUE task: data, start from a pretrained run (or scratch), train, evaluate each epoch, resume.

Read top to bottom like `hmoe.train.loop`, whose conventions it keeps: everything is checked (task files, the
starting run, the config) before the workdir is locked or written; the workdir is owned by one run with one config
(`hmoe.train.run_dir`); the `TrainState` (params = the LM's tree plus `classifier`, AdamW moments, routing state, rng,
step) is checkpointed with verified digests, and batches are a pure function of the step, so an interrupted run resumes
exactly; a non-finite loss stops the run with the last good state saved.

Each epoch ends with a dev evaluation written to `metrics.jsonl`. `results.json` reports the *last* epoch's dev scores
(the number to compare) and, separately and labelled, the *best* epoch's, with the epoch it came from, plus the
majority-class baseline on the same dev set.
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from hmoe.config import ExperimentConfig
from hmoe.data import wikitext
from hmoe.data.corpus import split_paths
from hmoe.data.tokenizer import Tokenizer, load_or_train_tokenizer
from hmoe.glue import data as glue_data, metrics as glue_metrics, tasks
from hmoe.glue.config import FinetuneConfig, GlueRunConfig, effective_experiment
from hmoe.glue.model import SequenceClassifier, example_losses, predictions
from hmoe.inference.run import load_run
from hmoe.parallel import sharding
from hmoe.routing.state import init_routing_state
from hmoe.train import checkpoint, metrics, optimizer as optimizer_lib, run_dir, step as step_lib
from hmoe.train.state import TrainState


def resolve_glue_dir(glue_dir: str | None) -> pathlib.Path:
  """`glue_dir`, else `$HMOE_DATA_DIR/glue`, else ../shared/data/glue (as the WikiText data)."""
  return pathlib.Path(glue_dir) if glue_dir else wikitext.resolve_data_dir(None) / "glue"


def read_examples(config: FinetuneConfig) -> dict[str, list[tasks.Example]]:
  """Every split the run needs: train and the labelled dev split(s), from the TSVs or tensorflow-datasets."""
  task = tasks.get_task(config.task)
  splits = ("train", *tasks.dev_splits(task))
  if config.input == "tfds":
    return {split: tasks.read_tfds_split(task, split, config.glue_dir) for split in splits}
  glue_dir = resolve_glue_dir(config.glue_dir)
  return {split: tasks.read_split(task, split, glue_dir) for split in splits}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: SequenceClassifier,
               optimizer: optax.GradientTransformation, config: ExperimentConfig, is_regression: bool
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on the task loss (+ the routed layers' auxiliary losses), with pretraining's NaN guard."""
  routed = config.model.routed

  def loss_fn(params):
    outputs, stats = model.apply({"params": params}, batch["tokens"], batch["lengths"], train=True,
                                 selection_bias=state.routing_state.selection_bias, rngs=step_lib.step_rngs(state))
    task_loss = jnp.mean(example_losses(outputs, batch["labels"], is_regression))
    if stats is None:
      return task_loss, ({"task_loss": task_loss}, stats)
    return task_loss + stats.auxiliary_loss(routed.loss_weights), ({"task_loss": task_loss, **stats.metrics()}, stats)

  (loss, (step_metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, update_metrics = step_lib.apply_gradients(state, loss, grads, stats, optimizer=optimizer, config=config)
  return new_state, {**step_metrics, **update_metrics}


def predict_step(params: Any, routing_state: Any, batch: dict[str, jax.Array], *, model: SequenceClassifier,
                 is_regression: bool) -> jax.Array:
  outputs, _ = model.apply({"params": params}, batch["tokens"], batch["lengths"], train=False,
                           selection_bias=routing_state.selection_bias)
  return predictions(outputs, is_regression)


def predict(predict_fn, params: Any, routing_state: Any, split: glue_data.EncodedSplit, batch_size: int) -> np.ndarray:
  """Predictions for every example of `split`, in order (the padded rows of the last batch dropped)."""
  outputs = [np.asarray(predict_fn(params, routing_state, {k: v for k, v in batch.items() if k != "weights"}))
             for batch in glue_data.eval_batches(split, batch_size)]
  return np.concatenate(outputs)[:len(split)]


def _initial_state(model: SequenceClassifier, optimizer: optax.GradientTransformation, experiment: ExperimentConfig,
                   example: glue_data.EncodedSplit, lm_params: Any | None, routing_state: Any | None) -> TrainState:
  """Fresh head (and trunk, from scratch) from the seed; the pretrained trunk and routing state where given."""
  rng = jax.random.PRNGKey(experiment.train.seed)
  init_rng, state_rng = jax.random.split(rng)
  init = jax.jit(lambda: nn.meta.unbox(model.init({"params": init_rng, "jitter": init_rng}, example.tokens[:2],
                                                  example.lengths[:2])["params"]))
  params = dict(init())
  if lm_params is not None:
    trunk = {key: value for key, value in params.items() if key != "classifier"}
    # An untied pretrained LM also has `unembed`, which the classifier never uses.
    pretrained = {key: value for key, value in lm_params.items() if key in trunk}
    if jax.tree.structure(pretrained) != jax.tree.structure(trunk) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves(trunk))):
      raise ValueError("the pretrained parameters do not fit the classifier's trunk (another model config?)")
    params.update(pretrained)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=state_rng,
                    nan_step=jnp.full((), -1, jnp.int32),
                    routing_state=routing_state if routing_state is not None else init_routing_state(experiment.model))


def _best(evals: list[dict[str, Any]], split: str, metric: str) -> dict[str, Any]:
  row = max(evals, key=lambda record: (record[f"{split}/{metric}"], -record["epoch"]))
  return {"epoch": row["epoch"], **{key.split("/", 1)[1]: value for key, value in row.items()
                                    if key.startswith(f"{split}/")}}


def finetune(config: FinetuneConfig, workdir: str | pathlib.Path, *,
             scratch_experiment: ExperimentConfig | None = None) -> dict[str, Any]:
  """Fine-tunes per `config` in `workdir` (resuming if it holds checkpoints); returns what `results.json` holds.

  `scratch_experiment`: the pretraining config whose model is trained from scratch when `config.scratch_config` is set
  (the entry point resolves the spec; the tokenizer is then trained on that config's WikiText train split).
  """
  config.validate()
  workdir = pathlib.Path(workdir)
  task = tasks.get_task(config.task)

  # ---------------------------------------------------------------- Inputs, checked before anything is written.
  examples = read_examples(config)
  if config.init_from:
    loaded = load_run(config.init_from)
    pretrained, tokenizer = loaded.config, loaded.tokenizer
    lm_params, routing_state = jax.device_get(loaded.params), loaded.routing_state
  else:
    if scratch_experiment is None:
      raise ValueError(f"finetune.scratch_config={config.scratch_config!r} needs its resolved pretraining config")
    pretrained, tokenizer, lm_params, routing_state = scratch_experiment, None, None, None
    wikitext_train = split_paths(pretrained.data)["train"]
  labels = {split: tasks.label_array(task, split_examples) for split, split_examples in examples.items()}
  dev = tasks.dev_splits(task)
  per_epoch = glue_data.steps_per_epoch(len(examples["train"]), config.batch_size)

  run_dir.check_writable(workdir)
  with run_dir.RunLock(workdir):
    run_dir.check_writable(workdir / "checkpoints")
    if tokenizer is None:
      tokenizer = load_or_train_tokenizer(wikitext_train, pretrained.model.vocab_size, workdir / "tokenizer.json")
    max_len = min(config.max_len, pretrained.model.max_len)
    encoded = {split: glue_data.encode(tokenizer, examples[split], labels[split], max_len) for split in examples}
    num_steps = per_epoch * config.num_epochs
    if config.max_steps:
      num_steps = min(num_steps, config.max_steps)
    experiment = effective_experiment(config, pretrained, num_steps)
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    try:
      steps = checkpointer.all_steps()
      run_dir.reconcile_config(workdir, GlueRunConfig(finetune=config, experiment=experiment), resuming=bool(steps),
                               step=steps[-1] if steps else 0)
      for split, split_encoded in encoded.items():
        logging.info("%s %s: %d examples, %d tokens wide, %d cut to %d tokens", task.name, split, len(split_encoded),
                     split_encoded.tokens.shape[1], split_encoded.num_truncated, max_len)
      return _run(config, task, experiment, workdir, checkpointer, encoded, dev, per_epoch, lm_params, routing_state,
                  tokenizer)
    finally:
      checkpointer.close()


def _run(config: FinetuneConfig, task: tasks.Task, experiment: ExperimentConfig, workdir: pathlib.Path,
         checkpointer: checkpoint.Checkpointer, encoded: dict[str, glue_data.EncodedSplit], dev: tuple[str, ...],
         per_epoch: int, lm_params: Any, routing_state: Any, tokenizer: Tokenizer) -> dict[str, Any]:
  train_cfg = experiment.train
  model = SequenceClassifier(experiment.model, task.num_outputs, config.pooling, config.head_dropout)
  optimizer = optimizer_lib.make_optimizer(train_cfg)
  state = _initial_state(model, optimizer, experiment, encoded["train"], lm_params, routing_state)
  restored = checkpointer.restore(checkpoint.abstract_like(state))
  if restored is not None:
    state = restored[1]
    logging.info("resumed from checkpoint at step %d", restored[0])
  start_step = int(state.step)
  metrics_path = workdir / "metrics.jsonl"
  run_dir.truncate_metrics(metrics_path, start_step if restored is not None else -1)
  writer = metrics.MetricsWriter(metrics_path)
  previous = [r for r in metrics.read_metrics(metrics_path) if "wall_seconds" in r] if metrics_path.exists() else []
  elapsed_before = previous[-1]["wall_seconds"] if previous else 0.0
  started = time.perf_counter()

  # The state lives on the one-device mesh from the start: an uncommitted first state and the mesh-typed states the
  # step returns are different input types to jit, so the train step would compile twice (17 s each on CPU).
  replicated = sharding.replicated(sharding.make_mesh(train_cfg.mesh_shape))
  state = jax.device_put(state, replicated)
  train_fn = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, config=experiment,
                                       is_regression=task.is_regression),
                     in_shardings=(replicated, replicated), out_shardings=(replicated, None), donate_argnums=0)
  predict_fn = jax.jit(functools.partial(predict_step, model=model, is_regression=task.is_regression))
  routed = experiment.model.routed
  recluster_every = routed.recluster_every if routed is not None and routed.clusters_experts else 0
  recluster_fn = jax.jit(functools.partial(step_lib.recluster_step, optimizer=optimizer, config=experiment),
                         in_shardings=(replicated,), out_shardings=replicated, donate_argnums=0)

  def save(step: int, state: TrainState) -> None:
    nan_step = int(state.nan_step)
    if nan_step >= 0:
      checkpointer.save(nan_step, state.replace(nan_step=jnp.full((), -1, jnp.int32)), force=True)
      raise FloatingPointError(f"the loss or update became non-finite at step {nan_step}; fine-tuning stopped. The "
                               f"state before it is checkpoint {nan_step} in {checkpointer.directory}: use a lower "
                               f"finetune.learning_rate in a new workdir, or resume that one as it is.")
    checkpointer.save(step, state)

  history = []
  for step in range(start_step, train_cfg.num_steps):
    state, step_metrics = train_fn(state, glue_data.train_batch(encoded["train"], step, config.batch_size,
                                                                train_cfg.seed))
    history.append(step_metrics)
    done = step + 1
    if done % train_cfg.log_every == 0 or done == train_cfg.num_steps:
      summary = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *history))
      record = {f"train/{key}": value for key, value in summary.items()
                if key in ("loss", "task_loss", "grad_norm", "learning_rate")}
      if "expert_load" in summary:
        record.update({f"train/{key}": value for key, value in metrics.load_balance(summary["expert_load"]).items()})
      record["wall_seconds"] = elapsed_before + time.perf_counter() - started
      writer.write(done, record)
      logging.info("step %d/%d: task loss %.4f", done, train_cfg.num_steps, record["train/task_loss"])
      history = []
    if recluster_every and done % recluster_every == 0 and done != train_cfg.num_steps:
      state = recluster_fn(state)
    epoch_end = done % per_epoch == 0 or done == train_cfg.num_steps
    if epoch_end:
      record = {"epoch": done / per_epoch}
      for split in dev:
        scores = glue_metrics.compute(task, predict(predict_fn, state.params, state.routing_state, encoded[split],
                                                    config.eval_batch_size), encoded[split].labels)
        record.update({f"{split}/{name}": value for name, value in scores.items()})
      record["wall_seconds"] = elapsed_before + time.perf_counter() - started
      writer.write(done, record)
      logging.info("step %d (epoch %.2f): %s", done, record["epoch"],
                   ", ".join(f"{key} {value:.4f}" for key, value in record.items() if "/" in key))
    if epoch_end or done % train_cfg.checkpoint_every == 0:
      save(done, state)
  save(int(state.step), state)
  writer.close()

  evals = [r for r in metrics.read_metrics(metrics_path) if "epoch" in r]
  majority = {split: glue_metrics.compute(task, glue_metrics.majority_predictions(
      task, encoded["train"].labels, len(encoded[split])), encoded[split].labels) for split in dev}
  results = {
      "task": task.name, "init_from": config.init_from or f"scratch:{config.scratch_config}",
      "ffn_kinds": list(experiment.model.ffn_kinds), "seed": config.seed, "steps": train_cfg.num_steps,
      "epochs": train_cfg.num_steps / per_epoch, "train_examples": len(encoded["train"]),
      "last": {split: {key.split("/", 1)[1]: value for key, value in evals[-1].items() if key.startswith(f"{split}/")}
               for split in dev},
      "best": {split: _best(evals, split, task.primary_metric) for split in dev},
      "majority": majority, "wall_seconds": evals[-1]["wall_seconds"], "tokenizer": tokenizer.fingerprint,
  }
  run_dir.write_json_atomic(workdir / "results.json", results)
  return results
