"""The training engine (``train(TrainConfig) -> TrainResult``), its fast data path and checkpoints."""
from .config import TrainConfig
from .engine import TrainResult, train
from .loader import TrainLoader

__all__ = ["TrainConfig", "TrainResult", "TrainLoader", "train"]
