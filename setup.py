"""vlcal_jax: VL-Calibration (decoupled visual/reasoning confidence RL) in JAX."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "chex>=0.1.90",
    "ml-collections>=1.0",
    "absl-py",
    "transformers>=5.0",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "pillow>=10",
    "numpy>=1.26",
    "pyarrow>=15",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "tqdm",
    "scipy>=1.11",
    "tensorflow-datasets>=4.9.7",
    "array_record",
    "importlib_resources",
]

EXTRAS = {
    # torch is pinned to the CPU wheel used for parity tests only; any other pin pulls CUDA.
    "test": [
        "pytest>=8",
        # the test run's two workers (pytest.ini: -n 2, one test file per worker at a time)
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "scikit-learn>=1.4",
        "torchmetrics>=1.4",
        "mathruler==0.1.0",
        # mathruler imports these without declaring them
        "pylatexenc",
        "sympy",
        # tests/test_colab_notebook.py executes launch/colab_tpu_demo.ipynb in a python3 kernel
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
    ],
    # gs:// workdirs: our logs, reports and exports go through fsspec's gcsfs (orbax writes
    # checkpoint arrays to GCS natively, its metadata through etils.epath -> fsspec)
    "gcs": ["gcsfs"],
    "tpu": ["jax[tpu]>=0.10", "gcsfs"],
    # python -m vlcal_jax.fit: libtpu compiles for TPU slices on a CPU host; pinned to the jax in use
    "fit": ["jax[tpu]==0.10.2"],
}

setup(
    name="vlcal_jax",
    version="0.1.0",
    description="VL-Calibration: decoupled visual and reasoning confidence calibration for LVLMs, in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vlcal_jax", "vlcal_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
