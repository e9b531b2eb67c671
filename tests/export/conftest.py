"""A tiny run exported once per session with the current Keras backend."""

from __future__ import annotations

import keras
import pytest


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """`(run_dir, version_dir)`: a random-weight kvlm_tiny run and its SavedModel."""
    if keras.backend.backend() not in ("tensorflow", "jax"):
        pytest.skip(f"SavedModel export needs the TensorFlow or JAX backend, not {keras.backend.backend()}")
    from kvlm.export.testing import tiny_export

    return tiny_export(tmp_path_factory.getbasetemp() / "kvlm_tiny_export")
