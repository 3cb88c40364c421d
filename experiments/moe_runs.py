"""MoE runs as the starting point of an HMoE: reading a run (state, scores, corpus) and upcycling it.

Flag-free, so tests and several entry points (`convert_moe.py`, `upcycle.py`) can import it together.
"""

import dataclasses
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
from absl import logging

from hmoe.clustering import convert
from hmoe.config import ExperimentConfig, from_config_dict
from hmoe.data.corpus import load_corpus
from hmoe.model.transformer import TransformerLM
from hmoe.train import checkpoint, optimizer as optimizer_lib, state as state_lib, step as step_lib
from hmoe.train.evaluation import evaluate
from hmoe.train.loop import train_and_evaluate


def restore_moe_state(config, workdir: pathlib.Path, step: int | None = None) -> state_lib.TrainState:
  """The MoE run's newest (or its `step`) checkpointed train state."""
  model = TransformerLM(config.model)
  optimizer = optimizer_lib.make_optimizer(config.train)
  abstract = jax.eval_shape(functools.partial(state_lib.init_train_state, model, optimizer, config))
  restored = checkpoint.Checkpointer(workdir / "checkpoints").restore(checkpoint.abstract_like(abstract), step)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  return restored[1]


def evaluate_all(config, params, routing_state, corpus) -> dict[str, float]:
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=TransformerLM(config.model)))
  results = {}
  for split in config.data.eval_splits:
    values = evaluate(eval_fn, params, routing_state, corpus.eval_splits[split], config.data, corpus.tokenizer.eos_id)
    results.update({f"{split}/loss": values["loss"], f"{split}/word_perplexity": values["word_perplexity"]})
  return results


def copy_corpus_cache(moe_workdir: pathlib.Path, workdir: pathlib.Path) -> None:
  """The MoE run's tokenizer and encoded splits: the same tokens, and no re-encoding."""
  for cached in ("tokenizer.json", "token_cache"):
    source, target = moe_workdir / cached, workdir / cached
    if not target.exists():
      (shutil.copytree if source.is_dir() else shutil.copy)(source, target)


def target_model(moe_config: ExperimentConfig, hmoe_config: ExperimentConfig):
  """The HMoE model of `hmoe_config`, checked to be the conversion of the MoE run's model (same trunk and experts)."""
  routed = hmoe_config.model.hmoe
  converted = convert.hmoe_model_config(moe_config.model, num_clusters=routed.num_clusters, rank=routed.rank,
                                        top_k_clusters=routed.top_k_clusters)
  # The HMoE-only fields come from the target config; every shared one must already agree.
  converted = dataclasses.replace(converted, hmoe=routed)
  if converted != hmoe_config.model:
    differing = [field.name for field in dataclasses.fields(converted)
                 if getattr(converted, field.name) != getattr(hmoe_config.model, field.name)]
    raise ValueError(f"the HMoE config is not a conversion of the MoE run's model: model fields {differing} differ")
  return converted


def upcycle(moe_workdir: pathlib.Path, moe_step: int, hmoe_config: ExperimentConfig, workdir: pathlib.Path,
        kmeans_seed: int = 0) -> dict:
  """`experiments/upcycle.py` (its docstring): convert the MoE run at `moe_step`, train on to the config's end."""
  if workdir.resolve() == moe_workdir.resolve():
    raise ValueError(f"--workdir={workdir} is the MoE run itself; the upcycled model needs a workdir of its own")
  moe_config = from_config_dict(json.loads((moe_workdir / "config.json").read_text()))
  if hmoe_config.model.routed_kind != "hmoe":
    raise ValueError(f"--config must be an HMoE model, got ffn_pattern={hmoe_config.model.ffn_pattern!r}")
  if not 0 < moe_step < hmoe_config.train.num_steps:
    raise ValueError(f"--moe_step={moe_step} must lie in (0, train.num_steps={hmoe_config.train.num_steps})")
  # Only what decides the training stream must match: where the files live and how evaluation batches are cut do not.
  differing = [name for name in ("dataset", "seq_len", "batch_size")
               if getattr(moe_config.data, name) != getattr(hmoe_config.data, name)]
  if differing:
    raise ValueError(f"the MoE run trained on other data than --config: data fields {differing} differ")
  target_model(moe_config, hmoe_config)
  moe_state = restore_moe_state(moe_config, moe_workdir, moe_step)
  corpus = load_corpus(moe_config.data, moe_config.model.vocab_size, moe_workdir)
  params, routing_state, info = convert.convert_moe_params(
      moe_state.params, hmoe_config.model, jax.random.PRNGKey(kmeans_seed), routing_state=moe_state.routing_state)
  summary = {"moe_workdir": str(moe_workdir), "moe_step": moe_step,
             "relative_error_per_layer": [round(float(e), 4) for e in info["relative_error"]],
             "moe": evaluate_all(moe_config, moe_state.params, moe_state.routing_state, corpus),
             "converted": evaluate_all(hmoe_config, params, routing_state, corpus)}
  logging.info("at step %d: MoE %s, converted %s", moe_step, summary["moe"], summary["converted"])
  workdir.mkdir(parents=True, exist_ok=True)
  copy_corpus_cache(moe_workdir, workdir)
  (workdir / "upcycle.json").write_text(json.dumps(summary, indent=2))
  warm_start = lambda state: state.replace(params=params, routing_state=routing_state,
                                           step=jnp.asarray(moe_step, jnp.int32))
  summary["final"] = train_and_evaluate(hmoe_config, workdir, warm_start=warm_start)
  (workdir / "upcycle.json").write_text(json.dumps(summary, indent=2))
  return summary
