"""Training and evaluation entry points."""

from kvlm.training.run import TrainConfig, evaluate, load_examples, load_run, train

__all__ = ["TrainConfig", "evaluate", "load_examples", "load_run", "train"]
