"""Replays recorded routing traces through the cache policies at many budgets, plots hit rate against budget, and
extrapolates bytes moved per token to the pod config on assumed host-to-device bandwidths.

  python -m experiments.offload_sim --traces='runs/offload/traces/*.json' --out=runs/offload/sim

The traces come from `experiments.offload_bench` (real greedy generation from trained runs). `replay` runs the
engine's own `hmoe.inference.residency` decisions, so a replay at the budget of a live run reproduces its counts
(tests/test_offload.py checks this). For every trace: budgets from one unit to all of them, LRU and LFU, each with and
without prefetch. Writes `<out>/hit_rate.png` and `<out>/sim.json`, and prints the pod extrapolation: the per-token
unit loads measured at a budget fraction are assumed to carry over to the pod config's experts at the same fraction
(the pod has 64 experts / 16 clusters per layer against the traced models' 32 / 8), multiplied by the pod's stored
unit bytes (`hmoe.inference.storage` defaults: INT4 experts and residuals, bfloat16 bases) and its routed layers.
"""

import glob
import json
import pathlib

import jax
import numpy as np
from absl import app, flags

from experiments.configs import pod
from hmoe.config import from_config_dict
from hmoe.inference import storage
from hmoe.inference.generate import decoding_config
from hmoe.inference.residency import TraceEvent, replay
from hmoe.model.transformer import TransformerLM

_TRACES = flags.DEFINE_string("traces", None, "Glob of trace files written by experiments.offload_bench.")
_OUT = flags.DEFINE_string("out", None, "Where hit_rate.png and sim.json are written.")
_POINTS = flags.DEFINE_integer("points", 24, "Budgets per trace, evenly spaced in units.")

flags.mark_flags_as_required(["traces", "out"])

# Assumed effective host-to-device bandwidths (one direction), GB/s: about 80% of the links' peak figures.
BANDWIDTHS_GB_S = {"PCIe 4.0 x16 (A100)": 25.0, "PCIe 5.0 x16 (H100/H200)": 50.0,
                   "NVLink-C2C (GH200)": 360.0}
REPORT_FRACTIONS = (1.0, 0.5, 0.25, 0.125)
VARIANTS = (("lru", False), ("lfu", False), ("lru", True), ("lfu", True))


def pod_unit_bytes() -> dict[str, dict[str, float]]:
  """Stored bytes of one unit of each offloading mode, and routed layer count, for the pod config's MoE and HMoE."""
  out = {}
  for variant in ("moe", "hmoe"):
    model = decoding_config(from_config_dict(pod.get_config(variant).to_dict()).model)  # One routing group.
    abstract = jax.eval_shape(lambda model=model: TransformerLM(model).init(
        jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), jax.numpy.int32))["params"])
    abstract = jax.tree.map(lambda leaf: leaf.value if hasattr(leaf, "value") else leaf, abstract,
                            is_leaf=lambda leaf: hasattr(leaf, "value"))
    stored = jax.eval_shape(lambda params, model=model: storage.compress(params, model), abstract)
    layer = stored[f"block_{model.routed_layers[0]}"][variant]
    sizes = {name: storage.stored_nbytes(node) for name, node in layer.items() if name != "router"}
    routed = model.routed
    if variant == "moe":
      modes = {"expert": sum(sizes.values()) / routed.num_experts}
      bases = 0.0
    else:
      bases = sum(size for name, size in sizes.items() if name.startswith("base_"))
      residuals = sum(size for name, size in sizes.items() if not name.startswith("base_"))
      modes = {"cluster": (bases + residuals) / routed.num_clusters, "residual": residuals / routed.num_experts}
    out[variant] = {"routed_layers": len(model.routed_layers), "expert_bytes_per_layer": sum(sizes.values()),
                    "base_bytes_per_layer": bases, **{f"unit_bytes_{mode}": size for mode, size in modes.items()}}
  return out


def simulate(trace: dict, points: int) -> list[dict]:
  events = [TraceEvent(kind, layer, tuple(units)) for kind, layer, units in trace["events"]]
  layers, units = trace["num_layers"], trace["units_per_layer"]
  total_units = layers * units
  rows = []
  for slots in sorted({max(1, round(x)) for x in np.linspace(1, total_units, points)}):
    fraction = (trace["resident_base_bytes"] + slots * trace["unit_bytes"]) / trace["expert_bytes"]
    for policy, prefetch in VARIANTS:
      stats = replay(events, num_layers=layers, units_per_layer=units, num_slots=slots, policy=policy,
                     prefetch=prefetch)
      rows.append({"slots": slots, "budget_fraction": fraction, "policy": policy, "prefetch": prefetch,
                   "hit_rate": stats.hit_rate,
                   "loads_per_token_per_layer": stats.loads / (trace["generated_tokens"] * layers)})
  return rows


def _plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib  # Optional dependency (`pip install -e .[plots]`): only this script plots.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(VARIANTS), figsize=(4.2 * len(VARIANTS), 3.6), sharey=True)
  for axis, (policy, prefetch) in zip(axes, VARIANTS):
    for name, rows in results.items():
      chosen = [row for row in rows if row["policy"] == policy and row["prefetch"] == prefetch]
      axis.plot([row["budget_fraction"] for row in chosen], [row["hit_rate"] for row in chosen], marker=".",
                label=name)
    axis.set_title(f"{policy.upper()}{' + prefetch' if prefetch else ''}")
    axis.set_xlabel("device budget (fraction of expert bytes)")
    axis.grid(alpha=0.3)
  axes[0].set_ylabel("cache hit rate")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  results, traces = {}, {}
  for file in sorted(glob.glob(_TRACES.value)):
    trace = json.loads(pathlib.Path(file).read_text())
    name = f"{pathlib.Path(trace['run']).name} ({trace['mode']})"
    traces[name] = trace
    results[name] = simulate(trace, _POINTS.value)
  if not results:
    raise SystemExit(f"error: no trace matches {_TRACES.value}")
  _plot(results, out / "hit_rate.png")
  pod_sizes = pod_unit_bytes()
  extrapolation = []
  for name, rows in results.items():
    trace = traces[name]
    sizes = pod_sizes[trace["kind"]]
    unit = sizes[f"unit_bytes_{trace['mode']}"]
    resident_bases = sizes["base_bytes_per_layer"] if trace["mode"] == "residual" else 0.0
    base_fraction = resident_bases / sizes["expert_bytes_per_layer"]
    for fraction in REPORT_FRACTIONS:
      if fraction <= base_fraction:
        continue
      for policy, prefetch in VARIANTS:
        chosen = [row for row in rows if row["policy"] == policy and row["prefetch"] == prefetch]
        # The simulated budget closest to this fraction (traced models and pod differ in unit granularity).
        row = min(chosen, key=lambda row: abs(row["budget_fraction"] - fraction))
        moved = row["loads_per_token_per_layer"] * unit * sizes["routed_layers"]
        extrapolation.append({"trace": name, "budget_fraction": fraction, "simulated_fraction": row["budget_fraction"],
                              "policy": policy, "prefetch": prefetch, "hit_rate": row["hit_rate"],
                              "pod_bytes_per_token": moved,
                              **{f"ms_per_token {link}": 1e3 * moved / (gbs * 1e9)
                                 for link, gbs in BANDWIDTHS_GB_S.items()}})
  (out / "sim.json").write_text(json.dumps({"pod": pod_sizes, "bandwidths_gb_s": BANDWIDTHS_GB_S,
                                            "replays": results, "pod_extrapolation": extrapolation}, indent=2))
  print("pod unit bytes:", json.dumps(pod_sizes))
  links = list(BANDWIDTHS_GB_S)
  header = ["trace", "budget (simulated)", "policy", "hit rate", "pod MiB/token", *(f"ms/token {l}" for l in links)]
  print("| " + " | ".join(header) + " |")
  for row in extrapolation:
    if row["policy"] == "lfu" and not row["prefetch"]:
      continue
    cells = [row["trace"], f"{row['budget_fraction']:.3f} ({row['simulated_fraction']:.3f})",
             row["policy"] + ("+prefetch" if row["prefetch"] else ""), f"{row['hit_rate']:.3f}",
             f"{row['pod_bytes_per_token'] / 2**20:.1f}", *(f"{row[f'ms_per_token {link}']:.2f}" for link in links)]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
