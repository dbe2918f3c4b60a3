from setuptools import find_packages, setup

setup(
    name="diffusiondet",
    version="0.1.0",
    description="DiffusionDet and DiffusionInst on detectron2",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs")),
    python_requires=">=3.10",
)
