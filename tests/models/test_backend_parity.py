"""Same weights give the same outputs on TensorFlow, JAX and PyTorch."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from kvlm.models import VLMClassifier

PREDICT = r"""
import json, sys
import numpy as np
import keras
from kvlm.models import VLMClassifier
folder = sys.argv[1]
config = json.load(open(f"{folder}/config.json"))
model = VLMClassifier.from_config(config)
model.load_weights(f"{folder}/model.weights.h5")
inputs = dict(np.load(f"{folder}/inputs.npz"))
np.save(f"{folder}/out_{keras.backend.backend()}.npy", keras.ops.convert_to_numpy(model(inputs, training=False)))
"""


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_outputs_match_across_backends(tmp_path, tiny_inputs, encoder):
    model = VLMClassifier.from_preset("kvlm_tiny", num_classes=6, vocabulary_size=60, encoder=encoder)
    # Non-trivial weights: perturb every variable so no layer sits at its initial value.
    rng = np.random.default_rng(5)
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in model.get_weights()])
    (tmp_path / "config.json").write_text(json.dumps(model.get_config()))
    model.save_weights(tmp_path / "model.weights.h5")
    np.savez(tmp_path / "inputs.npz", **tiny_inputs)
    expected = keras.ops.convert_to_numpy(model(tiny_inputs, training=False))
    script = tmp_path / "predict.py"
    script.write_text(PREDICT)
    for backend in ("jax", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, check=True, timeout=300)
        actual = np.load(tmp_path / f"out_{backend}.npy")
        np.testing.assert_allclose(actual, expected, atol=1e-4, err_msg=f"{backend} differs from tensorflow")
    assert np.abs(expected).max() > 1e-2  # outputs are not trivially zero
