"""hmoe: hierarchical Mixture-of-Experts language models in JAX/Flax."""

import setuptools

setuptools.setup(
    name="hmoe",
    version="0.1.0",
    description="Mixture-of-Experts language models that regroup their experts while training (JAX/Flax).",
    # Only the library: `experiments/` (entry points, configs, benchmarks) runs from a checkout.
    packages=setuptools.find_packages(include=["hmoe", "hmoe.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "absl-py>=2.1.0",
        "ml_collections>=1.0.0",
        "tokenizers>=0.20.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        # GLUE's official metrics (hmoe.glue.metrics): Matthews, F1, accuracy, Pearson, Spearman.
        "scikit-learn>=1.3",
        "scipy>=1.11",
        # TensorBoard event files beside metrics.jsonl (hmoe.train.metrics): needs only numpy and protobuf.
        "tensorboardX>=2.6",
    ],
    extras_require={
        # pytest-xdist: the suite runs on both cores, one test file per worker (pytest.ini), so a file's shared
        # compiled fixtures stay in one process.
        # nbclient + ipykernel execute the Colab notebook as a test (tests/test_notebook.py).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "chex>=0.1.88", "ruff>=0.6", "matplotlib>=3.8", "nbclient>=0.10",
                 "nbformat>=5.10", "ipykernel>=6.29"],
        # Figures of the experiments (experiments/offload_sim.py); the library never imports it.
        "plots": ["matplotlib>=3.8"],
    },
)
