"""Where a routed layer's forward + backward spends its time: a `jax.profiler` trace, summed per XLA op.

  python -m experiments.profile_layer --kind=hmoe      # T=8192, D=256, F=1024, E=32, G=4 clusters, R=16
  python -m experiments.profile_layer --kind=moe       # the sort-path MoE of the same E and F
  python -m experiments.profile_layer --tokens=2048 --expert_ff=512 --clusters=8   # compare.py's hmoe8x4 layer

Prints the --top ops by time per call with their result shapes from the compiled HLO. On CPU the executor runs
independent ops concurrently, so per-op times can sum to more than the wall time; read them as relative costs.
"""

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

from hmoe.config import HMoEConfig, MoEConfig
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.model.moe import MoEFeedForward

_KIND = flags.DEFINE_enum("kind", "hmoe", ["hmoe", "moe"], "Layer to profile.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens (one routing group).")
_EXPERT_FF = flags.DEFINE_integer("expert_ff", 1024, "Expert width F.")
_EXPERTS = flags.DEFINE_integer("experts", 32, "Experts E.")
_CLUSTERS = flags.DEFINE_integer("clusters", 4, "HMoE clusters G (E / G experts each).")
_TOP = flags.DEFINE_integer("top", 25, "Ops to print.")
_CALLS = 3


def main(argv):
  del argv
  width, hidden, experts = 256, _EXPERT_FF.value, _EXPERTS.value
  if _KIND.value == "hmoe":
    layer = HMoEFeedForward(HMoEConfig(num_experts=experts, num_clusters=_CLUSTERS.value, rank=16, top_k_clusters=1,
                                       top_k_experts=2, expert_ff=hidden))
  else:
    layer = MoEFeedForward(MoEConfig(num_experts=experts, top_k=2, expert_ff=hidden))
  x = jax.random.normal(jax.random.PRNGKey(1), (1, _TOKENS.value, width))
  params = layer.init(jax.random.PRNGKey(0), x, train=True)
  step = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x, train=True)[0]), argnums=(0, 1)))
  for _ in range(2):
    jax.block_until_ready(step(params, x))
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(_CALLS):
      jax.block_until_ready(step(params, x))
  trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[-1]))
  micros = collections.Counter()
  for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
    if event.get("ph") == "X" and not event["name"].startswith("$") and "Thunk" not in event["name"]:
      micros[event["name"]] += event.get("dur", 0)
  hlo = step.lower(params, x).compile().as_text()
  print(f"{_KIND.value} forward + backward, T={_TOKENS.value}, ms per call (sum over a {_CALLS}-call trace / {_CALLS})")
  for name, total in micros.most_common(_TOP.value):
    found = re.search(rf"%{re.escape(name)} = (\S+)", hlo)
    print(f"{total / _CALLS / 1e3:8.1f}  {name:28s} {found.group(1) if found else ''}")


if __name__ == "__main__":
  app.run(main)
