"""fsl-bench: few-shot learning benchmark suite (pretraining methods on timm backbones, episodic evaluation).

Importing the package is cheap; heavy modules (torch, timm, mlflow) load on first use.
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
