from pathlib import Path

from setuptools import setup

setup(
    name="adam-triton",
    version="0.1.0",
    description="torch.optim.Adam/AdamW as one fused Triton kernel over flat parameter buffers",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    # The Triton code lives in kernels/ and installs as adam_triton.kernels: a different
    # PyPI package is already called "kernels", so nothing may land in site-packages/kernels.
    packages=["adam_triton", "adam_triton.demo", "adam_triton.kernels"],
    package_dir={"adam_triton.kernels": "kernels"},
    # torch 2.11 is the oldest tested (the optimizer base class's graph-capture check took
    # its current name there). No triton here: CUDA builds of torch bring the triton they
    # were built with (3.6 from torch 2.11), CPU builds need none, and asking for another
    # would make pip replace the user's torch. Without triton >= 3.6 the pure-PyTorch
    # backend runs, with a warning on CUDA.
    install_requires=[
        "torch>=2.11",
        "numpy",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        # python -m adam_triton demo: progress bars and the plot.
        "demo": ["matplotlib", "tqdm"],
        # The tests run the demo, so they need what it needs, and every README example,
        # including those for Hugging Face's Trainer and PyTorch Lightning.
        "test": [
            # The kernel's tests run it through triton's interpreter, on CPU too.
            "triton>=3.6; platform_system == 'Linux'",
            "pytest>=7",
            "pytest-benchmark>=4",
            "expecttest",
            "matplotlib",
            "tqdm",
            "transformers",
            "accelerate",
            "lightning",
        ],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
    },
)
