"""Shared fixtures. The Keras backend comes from KERAS_BACKEND (tensorflow by default)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite compiles far more programs than it runs for long: JAX compiles every eager op and
# initializer shape, and each `fit` traces and optimizes a new graph. So the tests trade run-time
# optimization for compile time: XLA's CPU compiler at its cheapest settings (half the JAX pass's
# compile time), and no Grappler pass over TensorFlow graphs (a fifth of a short `fit`). Processes
# the tests start inherit the XLA flags; the product itself keeps both defaults.
FAST_XLA_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = " ".join([*os.environ.get("XLA_FLAGS", "").split(), *FAST_XLA_COMPILE])

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Keras and TensorFlow are imported where tests run, not here: pytest-xdist's controller process
# loads this file too, and importing them there would delay every worker's start by seconds.


@pytest.fixture(scope="session", autouse=True)
def _no_grappler():
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


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

    Tests of `long` files go first (a stable sort keeps each file's order), so that with
    `--dist loadfile --no-loadscope-reorder` no worker waits alone on a long file at the end.
    """
    import keras

    items.sort(key=lambda item: "long" not in item.keywords)
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
    import keras

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
