"""zeroshard: ZeRO-style memory-sharding optimizer for PyTorch."""

from setuptools import find_packages, setup

setup(
    name="zeroshard",
    version="0.1.0",
    description="ZeRO stages 0-3 sharded optimizer on torch.distributed with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # `kernels/` installs as `zeroshard_kernels`: a bare top-level `kernels` would clash with
    # other distributions that ship one.
    packages=find_packages(include=["zeroshard", "zeroshard.*"]) + ["zeroshard_kernels"],
    package_dir={"zeroshard": "zeroshard", "zeroshard_kernels": "kernels"},
    package_data={"zeroshard": ["py.typed"]},
    install_requires=["torch>=2.4", "pydantic>=2.5", "tqdm>=4.60", "safetensors>=0.4"],
    extras_require={
        "triton": ["triton>=3.0", "numpy"],
        "bench": ["matplotlib>=3.5"],
        # Framework integrations (zeroshard.integrations); the core never imports them.
        "transformers": ["transformers>=5.0", "accelerate>=1.0"],
        "lightning": ["lightning>=2.4"],
        "ray": ["ray[train]>=2.40"],
        "spark": ["pyspark>=3.5"],
        "test": [
            "pytest>=7", "ruff>=0.4", "numpy", "matplotlib>=3.5",
            "transformers>=5.0", "accelerate>=1.0", "lightning>=2.4", "ray[train]>=2.40",
            "pyspark>=3.5", "deepspeed>=0.15",
        ],
    },
    entry_points={
        "console_scripts": [
            "zeroshard-train=zeroshard.train:main",
            "zeroshard=zeroshard.cli.main:main",
        ]
    },
)
