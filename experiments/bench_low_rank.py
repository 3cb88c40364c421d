"""The HMoE's rank-R widening product alone: `hmoe.model.low_rank.widen` against the batched dot it replaced.

  python -m experiments.bench_low_rank            # T=8192-like stage-2 rows: 288 blocks of 64, R=16, F=1024

Every variant adds the rows' base products (as in the layer) and is timed forward and forward + backward (the
gradient of `sum(out ** 2)`, which needs the forward, w.r.t. the R-wide rows and the factors), round-robin with one
F-wide elementwise pass as the memory floor, median of --repeats. "unrolled, autodiff" is the same unrolled loop
without the custom VJP.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmark import format_table, interleaved_medians
from hmoe.model import low_rank

_BLOCKS = flags.DEFINE_integer("blocks", 288, "Row blocks N.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 64, "Rows per block S.")
_RANK = flags.DEFINE_integer("rank", 16, "Residual rank R.")
_WIDTH = flags.DEFINE_integer("width", 1024, "Output width F.")
_EXPERTS = flags.DEFINE_integer("experts", 32, "Experts E the blocks belong to.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per variant (median reported).")


def _batched_dot(p, v, blocks):
  return jnp.einsum("nsr,nro->nso", p, v[blocks])


def _unrolled_autodiff(p, v, blocks):
  return low_rank._widen(p, v[blocks])  # noqa: SLF001 - the loop without its custom VJP, for comparison.


def main(argv):
  del argv
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  n, s, r, f = _BLOCKS.value, _BLOCK_SIZE.value, _RANK.value, _WIDTH.value
  p = jax.random.normal(keys[0], (n, s, r))
  v = jax.random.normal(keys[1], (_EXPERTS.value, r, f))
  blocks = jax.random.randint(keys[2], (n,), 0, _EXPERTS.value)
  base = jax.random.normal(keys[3], (n, s, f))
  calls = {("elementwise pass", "forward"): (lambda fn: lambda: fn(base))(jax.jit(lambda b: b * 1.5 + 1.0))}
  for label, product in (("batched dot", _batched_dot), ("low_rank.widen", low_rank.widen),
                         ("unrolled, autodiff", _unrolled_autodiff)):
    forward = jax.jit(lambda p, v, product=product: product(p, v, blocks) + base)
    backward = jax.jit(jax.grad(lambda p, v, product=product: jnp.sum(jnp.square(product(p, v, blocks) + base)),
                                argnums=(0, 1)))
    calls[(label, "forward")] = lambda forward=forward: forward(p, v)
    calls[(label, "forward + backward")] = lambda backward=backward: backward(p, v)
  seconds = interleaved_medians(calls, repeats=_REPEATS.value)
  flops = 2.0 * n * s * r * f
  rows = [{"variant": label, "pass": mode, "ms": t * 1e3,
           "GFLOP/s (product)": (flops if mode == "forward" else 3 * flops) / t / 1e9 if label != "elementwise pass"
           else None} for (label, mode), t in seconds.items()]
  print(f"\nN={n} blocks of S={s} rows, R={r}, F={f}, {jax.devices()[0].platform}, median of {_REPEATS.value}\n")
  print(format_table(rows, ["variant", "pass", "ms", "GFLOP/s (product)"]))


if __name__ == "__main__":
  app.run(main)
