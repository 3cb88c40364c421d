"""Expert parallelism on fake CPU devices: bytes crossing the expert axis, per-shard load, regroup traffic, step time.

  python -m experiments.bench_expert_parallel --moe_run=runs/s15/moe --hmoe_run=runs/s15/hmoe8x4

For the standard MoE (32 experts, top-2) and the HMoE (8 clusters x 4, top-1 cluster, top-2 experts) of two trained
runs (`compare.py`, D=256), on meshes (data, expert) = (2, 4) and (1, 8) of 8 fake CPU devices:
- bytes per token crossing the expert axis per routed layer, forward and backward, from the all_to_all operands of
  the traced step (`expert_parallel.exchanged_bytes`) at capacity factor 1.25 (the pod config's), and the useful part
  (rows that carry an assignment, from the real routing of a validation batch);
- per-shard load (fraction of the rows each shard receives) and its CV, from that routing;
- the bytes a regroup moves between shards (experts whose shard changes carry their reconstructed weights), for an
  adopted regroup of the trained HMoE;
- train-step time with explicit expert parallelism against XLA's automatic partitioner on the same mesh (median of
  --repeats, after a warm-up). The 8 fake devices share this machine's cores, so the ratio says how much work each
  path adds, not what a real interconnect would do.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import benchmark  # noqa: E402
from hmoe.clustering import regroup  # noqa: E402
from hmoe.config import SIMILARITY_SIGNALS  # noqa: E402
from hmoe.data import wikitext  # noqa: E402
from hmoe.inference.run import load_run  # noqa: E402
from hmoe.model.transformer import TransformerLM  # noqa: E402
from hmoe.parallel import expert_parallel, sharding  # noqa: E402
from hmoe.train import optimizer as optimizer_lib, state as state_lib, step as step_lib  # noqa: E402

_MOE_RUN = flags.DEFINE_string("moe_run", "runs/s15/moe", "Trained standard-MoE run.")
_HMOE_RUN = flags.DEFINE_string("hmoe_run", "runs/s15/hmoe8x4", "Trained HMoE run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed train steps per variant (median).")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step (x 128 tokens).")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")
_REGROUP_ONLY = flags.DEFINE_bool("regroup_only", False, "Only the regroup traffic (no timing).")
_CAPACITY_FACTOR = 1.25
_MESHES = ((2, 4, 1), (1, 8, 1))


def _batch(loaded, batch_size):
  root = wikitext.resolve_data_dir(loaded.config.data.data_dir)
  tokens = wikitext.load_split(loaded.tokenizer, wikitext.wikitext_split_path(root, "wikitext-2", "valid")).tokens
  length = loaded.config.data.seq_len
  rows = np.asarray(tokens[:batch_size * (length + 1)]).reshape(batch_size, length + 1)
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def _parallel_config(config, mesh_shape, expert_parallel_on):
  model = config.model
  routed = dataclasses.replace(model.routed, expert_parallel=expert_parallel_on, dropless=False,
                               capacity_factor=_CAPACITY_FACTOR, num_groups=mesh_shape[0])
  return dataclasses.replace(config, model=dataclasses.replace(model, **{model.routed_kind: routed}),
                             train=dataclasses.replace(config.train, mesh_shape=mesh_shape))


def _shard_load(loaded, batch, shards):
  """Fraction of the exchanged rows each expert shard receives, per routed layer [L, shards]."""
  model = TransformerLM(loaded.config.model)
  _, stats = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False,
                                              selection_bias=loaded.routing_state.selection_bias))(
      loaded.params, batch["inputs"])
  load = stats.cluster_load if stats.cluster_load is not None else stats.expert_load
  load = np.asarray(load)
  return load.reshape(load.shape[0], shards, -1).sum(-1)


def _step_time_and_bytes(config, params, routing_state, batch, mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(functools.partial(state_lib.init_boxed_train_state, model, optimizer, config))
    state_sharding = sharding.logical_shardings(abstract, mesh)
    init = jax.jit(functools.partial(state_lib.init_train_state, model, optimizer, config),
                   out_shardings=state_sharding)
    state = init().replace(params=params, routing_state=routing_state)
    state = jax.device_put(state, state_sharding)
    train = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config),
                    in_shardings=(state_sharding, sharding.batch_sharding(mesh)))
    seconds = benchmark.median_seconds(lambda: train(state, batch), repeats=_REPEATS.value)
    exchanged = expert_parallel.exchanged_bytes(lambda s, b: train(s, b), state, batch)
  return seconds, exchanged


def _regroup_traffic(loaded, shards, signal):
  """Experts that change shard in a forced (adopt-always) regroup of the trained HMoE, and their bytes."""
  config = loaded.config.model
  forced = dataclasses.replace(config, hmoe=dataclasses.replace(config.hmoe, min_gain=-1.0, similarity_signal=signal))
  optimizer = optimizer_lib.make_optimizer(loaded.config.train)
  opt_state = optimizer.init(loaded.params)
  _, _, routing = jax.jit(functools.partial(regroup.recluster, config=forced, optimizer=optimizer))(
      loaded.params, opt_state, loaded.routing_state, jnp.asarray(loaded.step))
  before = np.asarray(loaded.routing_state.clusters.expert_id)
  after = np.asarray(routing.clusters.expert_id)
  num_experts = before.shape[-1]
  per_shard = num_experts // shards
  moved = 0
  for layer in range(before.shape[0]):
    old_shard = {int(e): p // per_shard for p, e in enumerate(before[layer])}
    moved += sum(old_shard[int(e)] != p // per_shard for p, e in enumerate(after[layer]))
  hmoe = config.hmoe
  expert_bytes = 3 * config.d_model * hmoe.expert_ff * 4  # Reconstructed gate/up/down, float32.
  return {"experts_moved": int(moved), "experts": int(before.size), "bytes_moved": int(moved * expert_bytes),
          "regroup_stability": np.asarray(routing.clusters.stability).round(3).tolist()}


def main(argv):
  del argv
  results = {"devices": len(jax.devices()), "capacity_factor": _CAPACITY_FACTOR, "runs": []}
  if _REGROUP_ONLY.value:
    loaded = load_run(_HMOE_RUN.value)
    for shards in (4, 8):
      row = {"run": _HMOE_RUN.value, "shards": shards,
             "regroup": {signal: _regroup_traffic(loaded, shards, signal) for signal in SIMILARITY_SIGNALS}}
      results["runs"].append(row)
      print(json.dumps(row))
  for path in () if _REGROUP_ONLY.value else (_MOE_RUN.value, _HMOE_RUN.value):
    loaded = load_run(path)
    batch = _batch(loaded, _BATCH.value)
    kind = loaded.config.model.routed_kind
    routed = loaded.config.model.routed
    tokens = batch["inputs"].size
    for mesh_shape in _MESHES:
      shards = mesh_shape[1]
      row = {"run": path, "kind": kind, "mesh": mesh_shape}
      times = {}
      for on in (False, True):
        config = _parallel_config(loaded.config, mesh_shape, on)
        seconds, exchanged = _step_time_and_bytes(config, loaded.params, loaded.routing_state, batch, mesh_shape)
        times[on] = seconds
        if on:
          picks = routed.top_k if kind == "moe" else routed.top_k_clusters
          tokens_per_device = tokens // (mesh_shape[0] * shards)
          capacity = expert_parallel.shard_capacity(tokens_per_device, picks, shards, _CAPACITY_FACTOR)
          layer = expert_parallel.communication_bytes(
              shards=shards, capacity=capacity, width=loaded.config.model.d_model, activation_bytes=4,
              tokens_per_device=tokens_per_device,
              metadata=expert_parallel.metadata_bytes(kind, getattr(routed, "top_k_experts", 0)))
          layers = loaded.config.model.num_routed_layers
          row.update(capacity=capacity, forward_bytes_per_token=layer["forward_per_token"],
                     backward_bytes_per_token=layer["backward_per_token"],
                     traced_step_bytes_per_device=exchanged,
                     formula_step_bytes_per_device=layers * (layer["forward_bytes_per_device"]
                                                             + layer["backward_bytes_per_device"]),
                     useful_rows_per_token=picks)
      load = _shard_load(loaded, batch, shards)
      cv = load.std(axis=1) / load.mean(axis=1)
      row.update(step_seconds_auto=times[False], step_seconds_explicit=times[True],
                 explicit_over_auto=times[True] / times[False], shard_load_cv_per_layer=cv.round(3).tolist(),
                 shard_load_cv_mean=float(cv.mean()))
      if kind == "hmoe":
        row["regroup"] = {signal: _regroup_traffic(loaded, shards, signal) for signal in SIMILARITY_SIGNALS}
      results["runs"].append(row)
      print(json.dumps(row))
  if _OUT.value:
    with open(_OUT.value, "w") as file:
      json.dump(results, file, indent=2)


if __name__ == "__main__":
  app.run(main)
