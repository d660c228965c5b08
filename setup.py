"""crate-fast: the fastest faithful CRATE (white-box transformer) in PyTorch + Triton.

The repository keeps three top-level folders; they install into one clean namespace:
``crate_fast`` <- crate_fast/, ``crate_fast.kernels`` <- kernels/, ``crate_fast.data`` <- data/.
"""
from setuptools import setup

setup(
    name="crate-fast",
    version="0.1.0",
    description="Fast, faithful CRATE (Coding RAte reduction TransformEr) with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["crate_fast", "crate_fast.analysis", "crate_fast.models", "crate_fast.probe", "crate_fast.training",
              "crate_fast.kernels", "crate_fast.data"],
    package_dir={
        "crate_fast": "crate_fast",
        "crate_fast.analysis": "crate_fast/analysis",
        "crate_fast.models": "crate_fast/models",
        "crate_fast.probe": "crate_fast/probe",
        "crate_fast.training": "crate_fast/training",
        "crate_fast.kernels": "kernels",
        "crate_fast.data": "data",
    },
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # FFCV builds a C extension against Debian's pkg-config libturbojpeg0-dev libopencv-dev.
        "data": ["ffcv==1.0.2", "numba", "opencv-python-headless", "scikit-learn", "scikit-image", "torchvision"],
        "bench": ["pytest", "pytest-benchmark", "timm"],
        "analysis": ["matplotlib", "scikit-image", "scikit-learn"],      # pictures; linear probes
        "tensorboard": ["tensorboard"],                                  # train.py --log tensorboard
        "wandb": ["wandb"],                                              # train.py --log wandb
        "hub": ["huggingface_hub"],          # pretrained=True, from_pretrained of a Hub repository, push_to_hub
        "dev": ["pytest", "pytest-benchmark", "ruff", "lion-pytorch", "timm", "huggingface_hub", "matplotlib",
                "scikit-learn", "scikit-image", "torchvision", "tensorboard", "wandb"],
    },
)
