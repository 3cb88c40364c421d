"""Why every matmul is flattened to one contracting axis: the same SwiGLU products in both layouts, one process.

  python -m experiments.bench_layout                  # dense T=8192, D=256, F=2048; experts E=16, C=1280, F=1024

Forward + backward (w.r.t. input and weights) of `hmoe.model.layers.swiglu` against the einsum layouts it replaced:
`bld,df->blf` on `[1, T, D]` (its weight gradient contracts over b and l) and `gnsd,ndf->gnsf` with one group g for
stacked experts. Timed round-robin (`benchmark.interleaved_medians`), median of --repeats; docs/speed.md quotes it.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmark import format_table, interleaved_medians
from hmoe.model.layers import swiglu

_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per variant (median reported).")


def _einsum_swiglu(x, w_gate, w_up, w_down, pattern):
  """The pre-change formulation: `pattern` for the input projections, d and f swapped for the output one."""
  inputs, output = pattern.split("->")
  x_spec, w_spec = inputs.split(",")
  down = f"{output},{w_spec.replace('d', '#').replace('f', 'd').replace('#', 'f')}->{x_spec}"
  hidden = jax.nn.silu(jnp.einsum(pattern, x, w_gate)) * jnp.einsum(pattern, x, w_up)
  return jnp.einsum(down, hidden, w_down)


def _grad_call(fn, *args):
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))))
  return lambda: grad(*args)


def main(argv):
  del argv
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  tokens, width, dense_ff, experts, capacity, expert_ff = 8192, 256, 2048, 16, 1280, 1024
  x = jax.random.normal(keys[0], (1, tokens, width))
  dense_w = [0.05 * jax.random.normal(k, s) for k, s in zip(keys[1:4], [(width, dense_ff)] * 2 + [(dense_ff, width)])]
  rows = jax.random.normal(keys[4], (1, experts, capacity, width))
  expert_w = [0.05 * jax.random.normal(k, s) for k, s in
              zip(keys[5:8], [(experts, width, expert_ff)] * 2 + [(experts, expert_ff, width)])]
  calls = {
      ("dense", "einsum bld,df on [1, T, D]"): _grad_call(
          lambda x, *w: _einsum_swiglu(x, *w, pattern="bld,df->blf"), x, *dense_w),
      ("dense", "swiglu (flattened [T, D])"): _grad_call(swiglu, x, *dense_w),
      ("experts", "einsum gnsd,ndf, g=1"): _grad_call(
          lambda r, *w: _einsum_swiglu(r, *w, pattern="gnsd,ndf->gnsf"), rows, *expert_w),
      ("experts", "swiglu nsd,ndf"): _grad_call(lambda r, *w: swiglu(r[0], *w), rows, *expert_w),
  }
  seconds = interleaved_medians(calls, repeats=_REPEATS.value)
  table = [{"layer": layer, "layout": layout, "fwd+bwd ms": s * 1e3} for (layer, layout), s in seconds.items()]
  print(f"\nSwiGLU forward + backward, float32, {jax.devices()[0].platform}, median of {_REPEATS.value}; dense "
        f"T={tokens}, D={width}, F={dense_ff}; experts E={experts}, C={capacity}, F={expert_ff}\n")
  print(format_table(table, ["layer", "layout", "fwd+bwd ms"]))


if __name__ == "__main__":
  app.run(main)
