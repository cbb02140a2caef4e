"""Package metadata for megatron-qk.

megatron-core is declared as the range the project is tested with: 0.16.1 on Python 3.11 and
0.19.2 on Python 3.12 by the whole suite, 0.17.1 and 0.18.2 by reading their internals
(docs/VERSIONS.md; the range and every version branch live in megatron_qk/compat/versions.py).
The exact versions of each tested leg are in requirements/constraints-*.txt. torch is declared as
a range that the CPU build 2.13.0 satisfies: install torch first (``pip install torch==2.13.0`` on
CPU) so pip does not pull CUDA wheels (on Python 3.12 the registry's 2.13.0 is the CUDA build,
which runs on the CPU). transformer-engine and apex are not installable from PyPI in a usable
form: on GPU use the NGC PyTorch image (docker/Dockerfile), which ships both.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # Keep in step with megatron_qk/compat/versions.py (MIN_VERSION, MAX_VERSION_EXCLUSIVE).
    "megatron-core>=0.16.1,<0.20",
    # megatron_qk.compat.versions compares versions (megatron-core depends on it too).
    "packaging>=24.2",
    "torch>=2.6",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "tiktoken>=0.9",
    "datasets>=3.0",
    "pyarrow>=15",
    "tqdm>=4.66",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    # megatron dist_checkpointing's writer processes need psutil (not declared by the wheel).
    "psutil>=5.9",
]

EXTRAS_REQUIRE = {
    "dev": ["pytest>=8", "ruff>=0.6"],
    # megatron-qk eval: the adapter subclasses lm-eval's TemplateLM and reads its task index,
    # whose internals change between releases, so the harness is pinned like megatron-core.
    "eval": ["lm-eval==0.4.13"],
    "wandb": ["wandb>=0.17"],
    # megatron-qk export --format hf, its tests, and `lm_eval --model hf` (needs accelerate) on
    # the export: pinned like the harness because the export writes transformers' config keys.
    "export": ["transformers==5.24.0", "safetensors==0.8.0", "accelerate==1.15.0"],
    # Documentation-only extra: transformer-engine and apex come from the NGC PyTorch image
    # (nvcr.io/nvidia/pytorch); pip wheels of TE need a matching CUDA toolchain.
    "gpu": [],
}

setup(
    name="megatron-qk",
    version="0.1.0",
    description=(
        "Megatron-Core extension: upper-layer Q/K learning-rate timing, maturity-triggered release "
        "and attention-specialization diagnostics"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_qk", "megatron_qk.*"]),
    package_data={"megatron_qk": ["config/presets/*.yaml", "data/assets/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["megatron-qk=megatron_qk.cli:main"]},
)
