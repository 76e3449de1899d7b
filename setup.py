from setuptools import find_packages, setup

setup(
    name="deltacomp",
    version="0.1.0",
    description="Compress a fine-tuned LLM as a small delta over its base",
    packages=find_packages(include=["deltacomp", "deltacomp.*"]),
    python_requires=">=3.10",
    # torch is deliberately not listed: scripts/install.sh pins it (an unpinned torch pulls a CUDA build).
    install_requires=["safetensors>=0.4", "numpy", "scipy", "tqdm", "transformers>=4.45", "gguf>=0.10", "peft"],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["deltacomp = deltacomp.cli:main"]},
)
