"""Tiny runs and request examples for tests, examples and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_tiny_run(run_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Writes a `kvlm_tiny` run folder (model.keras, vocabulary.txt, answers.txt, run.json).

    The model keeps its seeded random weights, which takes seconds.
    `overrides` go to the backbone (e.g. `encoder="vit"`).
    """
    import keras

    from kvlm.data import answer_vocabulary, build_vocabulary, shapes
    from kvlm.models import VLMClassifier
    from kvlm.runs import MODEL_FILE, TrainConfig, write_run_files

    run_dir = Path(run_dir)
    config = TrainConfig(
        output=str(run_dir), train_size=192, eval_size=8, epochs=1, batch_size=32,
        vocabulary_size=200, seed=seed, overrides=dict(overrides),
    )
    keras.utils.set_random_seed(seed)
    examples = shapes.generate(config.train_size, seed=seed)
    vocabulary = build_vocabulary(
        [e.question for e in examples] + [e.caption for e in examples], config.vocabulary_size
    )
    answers = answer_vocabulary(examples)
    model = VLMClassifier.from_preset(
        config.preset, num_classes=len(answers), vocabulary_size=len(vocabulary),
        encoder=config.encoder, **overrides,
    )
    write_run_files(run_dir, config, vocabulary, answers)
    model.save(run_dir / MODEL_FILE)
    return run_dir


def tiny_export(root: str | Path, name: str = "kvlm") -> tuple[Path, Path]:
    """A tiny run and its export under `root/<keras backend>/`, made on the first call.

    Returns `(run_dir, version_dir)`; later calls with the same `root` reuse them, so
    several test folders can share one session-wide export.
    """
    import keras

    from kvlm.export.layout import version_dirs
    from kvlm.export.savedmodel import export_model

    root = Path(root) / keras.backend.backend()
    run_dir, base_path = root / "run", root / "saved_models"
    if not (run_dir / "model.keras").exists():
        make_tiny_run(run_dir)
    versions = version_dirs(base_path / name)
    version_dir = versions[min(versions)] if versions else export_model(run_dir, base_path, name)
    return run_dir, version_dir


def copy_version(version_dir: str | Path, base_path: str | Path, name: str = "kvlm", version: int = 1) -> Path:
    """Copies an exported version folder to `base_path/name/version`; returns `base_path/name`."""
    import shutil

    target = Path(base_path) / name
    shutil.copytree(version_dir, target / str(version))
    return target


def example_requests(count: int, image_size: int = 32, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """`count` PNG-encoded procedural images and their questions."""
    import tensorflow as tf

    from kvlm.data import shapes

    examples = shapes.generate(count, seed=seed, image_size=image_size)
    images = [tf.io.encode_png(np.asarray(e.image, np.uint8)).numpy() for e in examples]
    return images, [e.question for e in examples]
