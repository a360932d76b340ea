"""The training loop and its run folder."""

from pesocli.train.loop import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
