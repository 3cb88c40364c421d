"""Test-wide JAX settings (8 fake CPU devices for sharding tests, strict rank promotion) and shared fixtures."""

import os
import pathlib
import tempfile

# Must happen before JAX initialises its backends; subprocesses (CLI and notebook tests) inherit them.
# - 8 fake CPU devices for the sharding and expert-parallel tests.
# - LLVM at -O0: the suite's time is mostly XLA compiling hundreds of tiny programs whose run time is negligible, and
#   LLVM's optimisation passes are half of that compile time (the four heaviest test files, each run beside the same
#   two training jobs: 702 -> 514 s). It changes code generation only, not the programs' semantics; goldens keep their
#   tolerances and exactness checks compare two runs compiled the same way.
# - XLA:CPU's older loop emitters instead of its MLIR fusion emitters (whose pipeline runs each fusion through many
#   more passes), and one LLVM module per program (the split buys nothing on 2 busy cores): the whole suite 925 -> 469 s
#   on 2026-12-03, 358 passed both times. To compare, run with XLA_FLAGS=--xla_cpu_use_fusion_emitters=true (flags
#   given in XLA_FLAGS win over these). Same caveat: code generation only; benchmarks and training keep XLA's defaults.
_TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
                   "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")
_flags = os.environ.get("XLA_FLAGS", "").split()
_given = {flag.split("=")[0] for flag in _flags}
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in _TEST_XLA_FLAGS if f.split("=")[0] not in _given])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# A persistent compilation cache, fresh for each test session and shared by its pytest-xdist workers: many tests in
# different files build the same tiny models and steps as new Python functions (so the in-memory jit cache misses),
# and an executable compiled once, by either worker, is reused from here. It never changes a result: the cache is
# keyed by the compiled program.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_CACHE_DIR = (os.path.join(tempfile.gettempdir(), f"hmoe_test_jax_cache_{_RUN_ID}") if _RUN_ID
              else tempfile.mkdtemp(prefix="hmoe_test_jax_cache_"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_WORDS = ("the cat dog sat on a mat and ran to <unk> house river stone @-@ , . of in was is it").split()


@pytest.fixture(scope="module")
def wikitext_dir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("data")
  (root / "wikitext-2").mkdir()
  rng = np.random.default_rng(0)
  for split, num_lines in (("train", 300), ("valid", 40), ("test", 40)):
    lines = [" = Heading = \n", " \n"]
    lines += [" " + " ".join(rng.choice(_WORDS, size=rng.integers(4, 20))) + " \n" for _ in range(num_lines)]
    (root / "wikitext-2" / f"wiki.{split}.tokens").write_text("".join(lines))
  return root


@pytest.fixture(autouse=True)
def _offline_wikitext(monkeypatch, tmp_path_factory):
  """Tests never reach the network: a missing WikiText file makes the trainer try a file:// URL that does not exist,
  which fails as an offline download does."""
  from hmoe.data import wikitext

  offline = tmp_path_factory.getbasetemp() / "offline_mirror"
  monkeypatch.setattr(wikitext, "WIKITEXT_URLS", {name: (offline / f"{name}-v1.zip").as_uri()
                                                  for name in wikitext.DATASETS})
