"""megabatch.train: the training app beside the library (the library never imports it).

    from megabatch.train import TrainConfig, from_preset, train
    train(from_preset("tiny", steps=5, output="runs/tiny"))

Command line: `megabatch train --help` (or `python -m megabatch.train`); see megabatch.train.cli.
"""
from .config import ModelConfig, TrainConfig, from_preset
from .loop import train

__all__ = ["ModelConfig", "TrainConfig", "from_preset", "train"]
