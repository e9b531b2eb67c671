"""The examples of a run: the procedural shapes set, plugin datasets mixed, or a user folder."""

from __future__ import annotations

import inspect

import numpy as np

from kvlm.data import load_folder, shapes
from kvlm.experts import datasets as discovered
from kvlm.models import get_preset
from kvlm.runs import TrainConfig


def mix_datasets(
    names: list[str], train_size: int, eval_size: int, seed: int, image_size: int
) -> tuple[list, list]:
    """`(train, eval)` examples mixing the named plugin datasets in equal shares.

    Each dataset gives `train_size // len(names)` examples of its `"train"` split
    and `eval_size // len(names)` of its `"test"` split (seeded with `seed`); each
    mix is shuffled with `seed`.

    Raises:
        ValueError: A name is not a discovered dataset (the message lists the
            available ones), is repeated, or a share would be empty.
    """
    names = list(names)
    available = discovered()
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"Unknown dataset(s) {', '.join(map(repr, unknown))}. Available datasets from the installed kvlm "
            f"plugins: {', '.join(sorted(available)) or 'none'}."
        )
    if not names or len(set(names)) != len(names):
        raise ValueError(f"`datasets` must name distinct datasets. Received: datasets={names!r}")
    per_train, per_eval = train_size // len(names), eval_size // len(names)
    if per_train < 1 or per_eval < 1:
        raise ValueError(
            f"`train_size` ({train_size}) and `eval_size` ({eval_size}) must each be at least the number of "
            f"datasets ({len(names)})."
        )
    rng = np.random.default_rng(seed)
    splits = []
    for split, per in (("train", per_train), ("test", per_eval)):
        examples = []
        for name in names:
            load = available[name].spec.load
            parameters = inspect.signature(load).parameters
            takes_size = "image_size" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
            options = {"image_size": image_size} if takes_size else {}
            examples += list(load(split, per, seed, **options))
        splits.append([examples[i] for i in rng.permutation(len(examples))])
    return splits[0], splits[1]


def load_examples(config: TrainConfig) -> tuple[list, list]:
    """Returns `(train, eval)` examples: the procedural set, plugin datasets mixed, or a user folder.

    Generated examples are drawn at the model's image size (`overrides["image_size"]` over the
    preset's); `train_size` and `eval_size` must be set (`kvlm.training.fit` fills the task's).
    """
    image_size = config.overrides.get("image_size", get_preset(config.preset)["image_size"])
    if config.datasets:
        if config.data_dir is not None:
            raise ValueError("Pass `data_dir` or `datasets`, not both.")
        return mix_datasets(config.datasets, config.train_size, config.eval_size, config.seed, image_size)
    if config.data_dir is None:
        return (
            shapes.generate(config.train_size, seed=config.seed, image_size=image_size),
            shapes.generate(config.eval_size, seed=config.seed + 10_000, image_size=image_size),
        )
    examples = load_folder(config.data_dir)
    order = np.random.default_rng(config.seed).permutation(len(examples))
    cut = max(1, int(round(len(examples) * config.eval_fraction)))
    return [examples[i] for i in order[cut:]], [examples[i] for i in order[:cut]]
