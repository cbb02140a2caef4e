"""Package metadata for megatron-qk.

Dependencies are pinned where the project relies on internal behaviour (megatron-core 0.16.1's
optimizer, scheduler and checkpoint layout). torch is declared as a range that the CPU build
2.13.0 satisfies: install torch first (``pip install torch==2.13.0`` on CPU) so pip does not pull
CUDA wheels. transformer-engine and apex are not installable from PyPI in a usable form: on GPU use
the NGC PyTorch image (docker/Dockerfile), which ships both.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "megatron-core>=0.16.1,<0.20",
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
