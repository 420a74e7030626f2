"""jaxalign: a JAX-native framework for aligning language models."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "transformers>=5.0",  # configs, tokenizers, checkpoint format (no torch needed)
    "tensorflow-datasets>=4.9.10",
    "importlib_resources",  # imported by tfds, declared there only for old Pythons
    "safetensors",
    "numpy",
    "tqdm",
    "grain>=0.2.18",  # checkpointable random-access iterators over TFDS data sources
    "tensorboardX",  # TensorBoard event files without TensorFlow
    "matplotlib",  # curves written as PNG at the end of a run
    "ml_collections",  # experiment config files (the Google JAX convention)
]

setup(
    name="jaxalign",
    version="0.1.0",
    description="JAX-native RLHF: reward models, PPO, DPO, GRPO, DAPO on TPU/GPU meshes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxalign", "jaxalign.*"]),
    include_package_data=True,
    package_data={"jaxalign.tasks": ["assets/arithmetic_tokenizer/*"]},
    install_requires=RUNTIME,
    extras_require={
        # torch is a test-time reference only, pinned to the CPU build.
        # libtpu (jax[tpu]): tests/test_plan.py compiles for a TPU topology on the CPU host.
        "test": ["pytest", "torch==2.13.0", "nbclient", "nbformat", "ipykernel", "jax[tpu]>=0.10,<0.11",
                 "gguf", "accelerate", "peft"],  # accelerate: transformers' GGUF loader (the parity reference)
        "gguf": ["gguf"],  # jaxalign.models.load_gguf (llama.cpp files)
        "tpu": ["jax[tpu]>=0.10,<0.11"],  # libtpu: runs on TPU VMs, and experiments/plan.py compiles for them anywhere
        "gpu": ["jax[cuda12]>=0.10,<0.11"],
    },
)
