"""Shared fixtures. The Keras backend comes from KERAS_BACKEND (tensorflow by default)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Skips `tensorflow_only` and `backend_independent` tests on the other backends, where
    `convergence` tests become slow.

    A `backend_independent` test checks code that never calls the Keras backend (tf.data
    pipelines, plugin discovery, the CLI's process set-up): one pass, on TensorFlow, checks it.

    A convergence test trains until a quality bar (loss, accuracy, BLEU, recall). The default
    suite trains on TensorFlow; the slow target trains on JAX and PyTorch too, since their layers,
    forward passes, `fit` steps and `.keras` round trips are already checked by the default suite.
    Runs before `-m` selection, so the added `slow` marks decide what is selected.
    """
    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"needs the TensorFlow backend, running on {keras.backend.backend()}")
    once = pytest.mark.skip(reason="backend-independent: checked once, on the TensorFlow pass")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)
        if "backend_independent" in item.keywords:
            item.add_marker(once)
        if "convergence" in item.keywords:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def shapes_examples():
    from kvlm.data import shapes

    return shapes.generate(256, seed=3)


@pytest.fixture(scope="session")
def vocabulary(shapes_examples):
    from kvlm.data import build_vocabulary

    return build_vocabulary([e.question for e in shapes_examples] + [e.caption for e in shapes_examples], 200)


@pytest.fixture(scope="session")
def tokenizer(vocabulary):
    from kvlm.data import make_tokenizer

    return make_tokenizer(vocabulary, 16)


@pytest.fixture
def tiny_inputs():
    rng = np.random.default_rng(0)
    token_ids = np.zeros((3, 16), dtype="int32")
    token_ids[0, :5] = [5, 6, 7, 8, 9]
    token_ids[1, :3] = [10, 11, 12]
    token_ids[2, :16] = np.arange(20, 36)
    return {"images": rng.random((3, 32, 32, 3), dtype=np.float32), "token_ids": token_ids}
