"""megabatch_train: the training app beside the library (the library never imports it).

    from megabatch_train import TrainConfig, from_preset, train
    train(from_preset("tiny", steps=5, output="runs/tiny"))

Command line: `megabatch train --help` (or `python -m megabatch_train`); see megabatch_train.cli.
`train` is imported on first use: the config and the command line need only the standard library,
so `--help` and usage errors work, and a missing [train] extra is named, before numpy or Pillow load.
"""
from typing import Any

from .config.sections import ModelConfig, TrainConfig, from_preset

__all__ = ["ModelConfig", "TrainConfig", "from_preset", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .run.loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
