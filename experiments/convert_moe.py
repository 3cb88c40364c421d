"""Post-hoc conversion: a trained standard MoE run -> hierarchical MoE, perplexity before, after and after fine-tuning.

  python -m experiments.convert_moe --moe_workdir=runs/compare/moe --members=4 --workdir=runs/convert/g8x4

Reads the MoE run's config and newest checkpoint, evaluates it on the full valid/test splits (with its balancing
biases, if any), converts every MoE layer (`hmoe.clustering.convert`: cluster the experts, shared base + rank-R SVD
residuals), evaluates the converted model without any training, then fine-tunes it for --finetune_steps on the
batches that follow the MoE run's last step (fresh AdamW at --finetune_lr, regrouping off) and evaluates again.
Prints a summary and writes it to <workdir>/summary.json.
"""

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from experiments.moe_runs import copy_corpus_cache, evaluate_all, restore_moe_state
from hmoe.clustering import convert
from hmoe.config import from_config_dict
from hmoe.data.corpus import load_corpus
from hmoe.model.param_counts import parameter_counts
from hmoe.train.loop import USER_ERRORS, quiet_library_logging, train_and_evaluate

_MOE_WORKDIR = flags.DEFINE_string("moe_workdir", None, "Workdir of a finished standard-MoE run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the converted model is fine-tuned.")
_MEMBERS = flags.DEFINE_integer("members", 4, "Experts per cluster M (G = E / M).")
_RANK = flags.DEFINE_integer("rank", 16, "Residual rank R.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 100, "Fine-tuning steps after conversion (0: none).")
_FINETUNE_LR = flags.DEFINE_float("finetune_lr", 3e-4, "Peak learning rate of the fine-tuning (10 warm-up steps).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the k-means seeding.")

flags.mark_flags_as_required(["moe_workdir", "workdir"])


def run(moe_workdir: pathlib.Path, workdir: pathlib.Path, *, members: int, rank: int, finetune_steps: int,
        finetune_lr: float, seed: int = 0) -> dict:
  """The whole experiment; returns (and writes to <workdir>/summary.json) the summary."""
  if workdir.resolve() == moe_workdir.resolve():
    raise ValueError(f"--workdir={workdir} is the MoE run itself; the converted model needs a workdir of its own")
  moe_config = from_config_dict(json.loads((moe_workdir / "config.json").read_text()))
  num_experts = moe_config.model.moe.num_experts
  if num_experts % members:
    raise ValueError(f"--members={members} must divide the MoE's {num_experts} experts")
  hmoe_model = convert.hmoe_model_config(moe_config.model, num_clusters=num_experts // members, rank=rank,
                                         recluster_every=0)
  # The MoE run's cached tokenizer and encoded splits.
  corpus = load_corpus(moe_config.data, moe_config.model.vocab_size, moe_workdir)

  moe_state = restore_moe_state(moe_config, moe_workdir)
  moe_step = int(moe_state.step)
  summary = {"moe_step": moe_step, "members": members, "rank": rank, "finetune_steps": finetune_steps}
  summary["moe"] = {**parameter_counts(moe_state.params, moe_config.model),
                    **evaluate_all(moe_config, moe_state.params, moe_state.routing_state, corpus)}
  logging.info("MoE at step %d: %s", moe_step, summary["moe"])

  params, routing_state, info = convert.convert_moe_params(moe_state.params, hmoe_model, jax.random.PRNGKey(seed),
                                                           routing_state=moe_state.routing_state)
  hmoe_config = dataclasses.replace(moe_config, model=hmoe_model)
  summary["relative_error_per_layer"] = [round(float(e), 4) for e in info["relative_error"]]
  summary["converted"] = {**parameter_counts(params, hmoe_model),
                          **evaluate_all(hmoe_config, params, routing_state, corpus)}
  logging.info("converted, no training: %s", summary["converted"])

  workdir.mkdir(parents=True, exist_ok=True)
  if finetune_steps:
    copy_corpus_cache(moe_workdir, workdir)
    finetune_config = dataclasses.replace(hmoe_config, train=dataclasses.replace(
        moe_config.train, num_steps=moe_step + finetune_steps, learning_rate=finetune_lr,
        warmup_steps=min(10, finetune_steps), min_lr_ratio=1.0, eval_every=moe_step + finetune_steps,
        checkpoint_every=finetune_steps))
    finetune_config.validate()
    # Data position continues after the MoE run's last batch; the optimizer starts fresh (new parameterisation).
    warm_start = lambda state: state.replace(params=params, routing_state=routing_state,
                                             step=jnp.asarray(moe_step, jnp.int32))
    results = train_and_evaluate(finetune_config, workdir, warm_start=warm_start)
    summary["finetuned"] = {key: value for key, value in results.items()
                            if key.endswith(("/loss", "/word_perplexity"))}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def main(argv):
  del argv
  quiet_library_logging()
  try:
    summary = run(pathlib.Path(_MOE_WORKDIR.value), pathlib.Path(_WORKDIR.value), members=_MEMBERS.value,
                  rank=_RANK.value, finetune_steps=_FINETUNE_STEPS.value, finetune_lr=_FINETUNE_LR.value,
                  seed=_SEED.value)
  except USER_ERRORS as error:
    sys.exit(f"error: {error}")
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
