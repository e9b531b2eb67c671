"""Same weights give the same outputs on TensorFlow, JAX and PyTorch."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from kvlm.models import VLMClassifier

pytestmark = pytest.mark.long

ENCODERS = ("vit", "cnn")

PREDICT = r"""
import json, sys
import numpy as np
import keras
from kvlm.models import VLMClassifier
folder = sys.argv[1]
inputs = dict(np.load(f"{folder}/inputs.npz"))
for encoder in sys.argv[2:]:
    model = VLMClassifier.from_config(json.load(open(f"{folder}/{encoder}.json")))
    model.load_weights(f"{folder}/{encoder}.weights.h5")
    outputs = keras.ops.convert_to_numpy(model(inputs, training=False))
    np.save(f"{folder}/{encoder}_{keras.backend.backend()}.npy", outputs)
"""


@pytest.mark.tensorflow_only
def test_outputs_match_across_backends(tmp_path, tiny_inputs):
    """ViT and CNN classifiers, every variable perturbed so no layer sits at its initial value,
    predict the same on JAX and PyTorch (one process per backend) as on TensorFlow."""
    rng = np.random.default_rng(5)
    expected = {}
    for encoder in ENCODERS:
        model = VLMClassifier.from_preset("kvlm_tiny", num_classes=6, vocabulary_size=60, encoder=encoder)
        model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in model.get_weights()])
        (tmp_path / f"{encoder}.json").write_text(json.dumps(model.get_config()))
        model.save_weights(tmp_path / f"{encoder}.weights.h5")
        expected[encoder] = keras.ops.convert_to_numpy(model(tiny_inputs, training=False))
        assert np.abs(expected[encoder]).max() > 1e-2  # outputs are not trivially zero
    np.savez(tmp_path / "inputs.npz", **tiny_inputs)
    script = tmp_path / "predict.py"
    script.write_text(PREDICT)
    for backend in ("jax", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, str(script), str(tmp_path), *ENCODERS], env=env, check=True, timeout=300)
        for encoder in ENCODERS:
            actual = np.load(tmp_path / f"{encoder}_{backend}.npy")
            np.testing.assert_allclose(actual, expected[encoder], atol=1e-4,
                                       err_msg=f"{encoder}: {backend} differs from tensorflow")
