"""Package definition for fsl-bench (``fsl_lsskd``). Exact pins live in constraints.txt; ranges here."""
from setuptools import find_packages, setup

setup(
    name="fsl-lsskd",
    version="0.1.0",
    description="fsl-bench: few-shot learning benchmark suite for pretraining methods on timm backbones",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fsl_lsskd", "fsl_lsskd.*"]),
    install_requires=[
        "torch>=2.14,<2.15",
        "torchvision>=0.29,<0.30",
        "timm>=1.0.20,<1.1",
        "scikit-learn>=1.5,<2",
        "mlflow>=3.17,<3.18",
        "click>=8.1,<9",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",
        "pandas>=2.1,<4",
        "pyyaml>=6,<7",
        "tqdm>=4.66,<5",
        "pillow>=10",
        "matplotlib>=3.8,<4",
        "requests>=2.31,<3",
        "torchmetrics>=1.4,<2",   # calibration error (checked against our reliability statistics)
        "submitit>=1.5,<2",       # fsl-bench run --launcher local|slurm
        # edge column: ONNX export (torch.onnx dynamo exporter needs onnxscript), int8 and latency (onnxruntime)
        "onnx>=1.18,<1.24",
        "onnxscript>=0.3,<0.8",
        "onnxruntime>=1.22,<1.33",
        # learn2learn 0.2.0 (installed by tools/install_learn2learn.sh) imports gym at import time
        "gym==0.26.2",
        "gym-notices==0.0.8",
    ],
    # psycopg2-binary: the PostgreSQL driver of the MLflow server tests/test_postgres.py starts
    extras_require={"dev": ["pytest>=8,<10", "cython>=3,<4", "psycopg2-binary>=2.9,<3"]},
    entry_points={"console_scripts": ["fsl-bench=fsl_lsskd.cli:main"]},
)
