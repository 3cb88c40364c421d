"""Offloaded generation from trained runs: hit rate, bytes moved, resident bytes and decode speed per budget and policy.

  python -m experiments.offload_bench --runs=runs/s15c/moe,runs/s15c/hmoe8x4 --out=runs/offload

For each run (a run directory or a compressed export, `experiments/compress.py`) and each offloading mode of its kind
(MoE: experts; HMoE: whole clusters, or resident bases + moving residuals), greedy batch-1 generation of
`--new_tokens` tokens after each of `--num_prompts` WikiText-2 validation prompts, served one after the other by one
engine (a server's cache persists across requests), at every budget of `--budgets` (fractions of the stored expert
bytes) and every policy of `--policies`, with and without prefetch. Every offloaded run must produce the resident
model's tokens (checked). Reported per setting: cache hit rate and bytes moved host-to-device per generated token
(prefill included), peak resident expert bytes, time in copies, decode tokens/s (prefill excluded; compiled beforehand
on an engine of the same shapes), against the resident model and a dense model with the same active FFN width
(random weights: only its speed is used). Writes `<out>/offload.json` and the routing trace of each run and mode
(`<out>/traces/*.json`, replayed at many budgets by `experiments.offload_sim`).
"""

import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags

from hmoe.data import wikitext
from hmoe.inference import offload
from hmoe.inference.generate import Generator
from hmoe.inference.run import load_run
from hmoe.model.transformer import TransformerLM
from hmoe.testing import init_params
from hmoe.train.loop import USER_ERRORS, quiet_library_logging

_RUNS = flags.DEFINE_list("runs", None, "Run directories or compressed exports.")
_OUT = flags.DEFINE_string("out", None, "Where offload.json and traces/ are written.")
_BUDGETS = flags.DEFINE_list("budgets", ["1", "0.5", "0.25", "0.125"], "Budgets, fractions of the expert bytes.")
_POLICIES = flags.DEFINE_list("policies", ["lru", "lfu"], "Eviction policies.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 4, "Prompts, served one after the other.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 32, "Tokens per prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Tokens generated per prompt.")

flags.mark_flags_as_required(["runs", "out"])


def _prompts(loaded, count: int, length: int) -> list[list[int]]:
  """`count` prompts of `length` tokens, evenly spaced through the WikiText-2 validation split."""
  root = wikitext.resolve_data_dir(loaded.config.data.data_dir)
  tokens = wikitext.load_split(loaded.tokenizer, wikitext.wikitext_split_path(root, "wikitext-2", "valid")).tokens
  stride = len(tokens) // count
  return [tokens[i * stride:i * stride + length].tolist() for i in range(count)]


def _serve(generator: Generator, prompts: list[list[int]], new_tokens: int) -> tuple[np.ndarray, float]:
  """Greedy tokens [prompts, new_tokens] and the seconds spent in decode steps (prefill excluded)."""
  outputs, decode_seconds = [], 0.0
  for prompt in prompts:
    tokens, lengths = generator._pad([prompt], new_tokens)
    logits, cache = generator.run_prefill(tokens, lengths)
    logits.block_until_ready()
    positions, row = np.asarray(lengths), []
    start = time.perf_counter()
    for step in range(new_tokens):
      next_tokens = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)
      row.append(int(next_tokens[0]))
      if step + 1 < new_tokens:
        logits, cache = generator.run_decode_step(cache, next_tokens, positions)
        positions = positions + 1
    decode_seconds += time.perf_counter() - start
    outputs.append(row)
  return np.asarray(outputs), decode_seconds


def _dense_twin(config):
  """The same trunk with dense FFNs as wide as a routed layer's active width (shared + top-k experts)."""
  routed = config.routed
  picks = routed.top_k if config.routed_kind == "moe" else routed.top_k_clusters * routed.top_k_experts
  width = picks * routed.expert_ff + config.shared_expert_ff
  return dataclasses.replace(config, ffn_pattern="dense", d_ff=width, shared_expert_ff=0)


def _measure_run(path: str, out: pathlib.Path) -> dict:
  loaded = load_run(path)
  config = loaded.config.model
  prompts = _prompts(loaded, _NUM_PROMPTS.value, _PROMPT_TOKENS.value)
  decode_tokens = len(prompts) * (_NEW_TOKENS.value - 1)
  generated = len(prompts) * _NEW_TOKENS.value
  resident = Generator(config, loaded.params, loaded.routing_state)
  _serve(resident, prompts[:1], 2)  # Compile.
  reference, seconds = _serve(resident, prompts, _NEW_TOKENS.value)
  dense_config = _dense_twin(config)
  dense = Generator(dense_config, init_params(TransformerLM(dense_config), np.zeros((1, 8), np.int32)),
                    loaded.routing_state.replace(selection_bias=None))
  _serve(dense, prompts[:1], 2)
  _, dense_seconds = _serve(dense, prompts, _NEW_TOKENS.value)
  result = {"run": path, "kind": config.routed_kind, "resident_tokens_per_second": decode_tokens / seconds,
            "dense_d_ff": dense_config.d_ff, "dense_tokens_per_second": decode_tokens / dense_seconds,
            "settings": []}
  print(f"{path}: resident {result['resident_tokens_per_second']:.1f} tok/s, dense twin (d_ff={dense_config.d_ff}) "
        f"{result['dense_tokens_per_second']:.1f} tok/s")
  (out / "traces").mkdir(parents=True, exist_ok=True)
  for mode in offload.MODES[config.routed_kind]:
    for budget in map(float, _BUDGETS.value):
      for policy in _POLICIES.value:
        for prefetch in (False, True):
          settings = offload.OffloadConfig(budget_fraction=budget, policy=policy, mode=mode, prefetch=prefetch)
          try:  # Compile on a throwaway engine of the same shapes, then measure a fresh (cold) cache.
            _serve(offload.OffloadedGenerator(offload.OffloadedModel(config, loaded.params, loaded.routing_state,
                                                                     settings)), prompts[:1], 2)
          except ValueError as error:  # E.g. resident bases alone exceed the budget in "residual" mode.
            result["settings"].append({"mode": mode, "budget_fraction": budget, "policy": policy,
                                       "prefetch": prefetch, "infeasible": str(error)})
            print(f"  {mode:8s} budget {budget:5.3f}: {error}")
            continue
          engine = offload.OffloadedModel(config, loaded.params, loaded.routing_state, settings)
          tokens, seconds = _serve(offload.OffloadedGenerator(engine), prompts, _NEW_TOKENS.value)
          stats = engine.residency.stats
          row = {"mode": mode, "budget_fraction": budget, "policy": policy, "prefetch": prefetch,
                 "same_tokens": bool(np.array_equal(tokens, reference)), **stats.as_dict(),
                 "unit_bytes": engine.unit_bytes, "expert_bytes": engine.expert_bytes,
                 "bytes_moved_per_token": stats.loads * engine.unit_bytes / generated,
                 "peak_resident_expert_bytes": engine.resident_expert_bytes,
                 "copy_seconds_per_token": engine.load_seconds / generated,
                 "decode_tokens_per_second": decode_tokens / seconds}
          result["settings"].append(row)
          print(f"  {mode:8s} budget {budget:5.3f} {policy} prefetch={prefetch!s:5s} hit {row['hit_rate']:.3f} "
                f"moved {row['bytes_moved_per_token'] / 2**20:7.2f} MiB/token resident "
                f"{row['peak_resident_expert_bytes'] / 2**20:6.2f} MiB decode {row['decode_tokens_per_second']:6.1f} "
                f"tok/s same tokens: {row['same_tokens']}")
          if budget == 1.0 and policy == _POLICIES.value[0] and not prefetch:
            trace = {"run": path, "kind": config.routed_kind, "mode": mode, "num_layers": len(config.routed_layers),
                     "units_per_layer": engine.units_per_layer, "unit_bytes": engine.unit_bytes,
                     "resident_base_bytes": engine.resident_base_bytes, "expert_bytes": engine.expert_bytes,
                     "generated_tokens": generated,
                     "events": [[event.kind, event.layer, list(event.units)] for event in engine.trace]}
            name = pathlib.Path(path).name
            (out / "traces" / f"{name}_{mode}.json").write_text(json.dumps(trace))
  return result


def main(argv):
  del argv
  quiet_library_logging()
  out = pathlib.Path(_OUT.value)
  try:
    results = [_measure_run(path, out) for path in _RUNS.value]
  except USER_ERRORS as error:
    sys.exit(f"error: {error}")
  results = {"device": str(jax.devices()[0]), "num_prompts": _NUM_PROMPTS.value,
             "prompt_tokens": _PROMPT_TOKENS.value, "new_tokens": _NEW_TOKENS.value, "runs": results}
  (out / "offload.json").write_text(json.dumps(results, indent=2))
  if not all(row.get("same_tokens", True) for run in results["runs"] for row in run["settings"]):
    sys.exit("error: an offloaded run generated other tokens than the resident model")


if __name__ == "__main__":
  app.run(main)
