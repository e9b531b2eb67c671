"""A held-out third-party plugin written only against the documented contract, as a real
installed distribution: discovered, trained inside a SparseMoE, saved, loaded, conformant."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="packaging and discovery run once, on tensorflow (about a minute); a documented-contract expert "
    "is checked on every backend by test_experts_testing.py::test_expert_without_compute_output_shape_passes",
)

PYPROJECT = """
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "acme-kvlm-experts"
version = "1.2.0"
requires-python = ">=3.11"

[project.entry-points.kvlm]
acme = "acme_kvlm"
"""

# Only the documented fields, a plain build callable, no kvlm base class, no compute_output_shape.
MODULE = '''
import keras
import kvlm


@keras.saving.register_keras_serializable(package="acme_kvlm")
class XRayExpert(keras.layers.Layer):
    def __init__(self, d_model, width=12, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.width = d_model, width
        self.up = keras.layers.Dense(width, activation="relu")
        self.down = keras.layers.Dense(d_model)

    def build(self, input_shape):
        self.up.build(input_shape)
        self.down.build(tuple(input_shape[:-1]) + (self.width,))

    def call(self, x):
        return self.down(self.up(x))

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "width": self.width}


def build_xray(d_model, **options):
    return XRayExpert(d_model, **options)


@kvlm.hookimpl
def kvlm_register_experts():
    return [kvlm.ExpertSpec(name="acme", domain="radiology", build=build_xray, version="1.2.0",
                            description="X-ray expert.", vocabulary=("xray", "fracture"))]
'''

TRAIN = """
import json, sys
import keras, numpy as np
import acme_kvlm, kvlm, kvlm.testing
from kvlm.layers import SparseMoE

info = kvlm.experts.available()["acme"]
inputs = keras.Input((6, 8))
moe = SparseMoE(["ffn", "acme"], top_k=1, name="moe")
model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(moe(inputs))))
model.compile(optimizer="adam", loss="mse")
x = np.random.default_rng(0).normal(size=(8, 6, 8)).astype("float32")
before = [keras.ops.convert_to_numpy(w) for w in moe.bank.expert_layers[1].weights]
history = model.fit(x, np.ones((8, 1), "float32"), batch_size=8, epochs=1, verbose=0)
after = [keras.ops.convert_to_numpy(w) for w in moe.bank.expert_layers[1].weights]
model.save(sys.argv[1])
loaded = kvlm.load_model(sys.argv[1])
found = kvlm.testing.check_plugin(acme_kvlm, d_model=8, distribution="acme-kvlm-experts")
print(json.dumps({
    "distribution": [info.distribution, info.version, info.spec.domain],
    "expert": type(moe.bank.expert_layers[1]).__name__,
    "config": moe.get_config()["expert_distributions"],
    "loss": history.history["loss"][0],
    "acme_trained": any(not np.allclose(a, b) for a, b in zip(before, after)),
    "same": float(np.abs(keras.ops.convert_to_numpy(loaded(x)) - keras.ops.convert_to_numpy(model(x))).max()),
    "checked": [s.name for s in found["experts"]],
}))
"""

LOAD_WITHOUT_PLUGIN = """
import sys, kvlm
try:
    kvlm.load_model(sys.argv[1])
except Exception as error:
    print(type(error).__name__, error)
"""


@pytest.fixture(scope="module")
def acme_site(tmp_path_factory):
    """The acme distribution built and pip-installed into a folder of its own."""
    root = tmp_path_factory.mktemp("acme")
    source, site = root / "acme-kvlm-experts", root / "site"
    (source / "acme_kvlm").mkdir(parents=True)
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "acme_kvlm" / "__init__.py").write_text(textwrap.dedent(MODULE))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input", "-q",
         "--disable-pip-version-check", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (site / "acme_kvlm_experts-1.2.0.dist-info" / "entry_points.txt").exists()
    return site


def test_acme_plugin_trains_saves_loads_and_conforms(acme_site, tmp_path, run_python):
    path = tmp_path / "acme.keras"
    result = run_python(["-c", TRAIN, str(path)], env={"PYTHONPATH": str(acme_site)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["distribution"] == ["acme-kvlm-experts", "1.2.0", "radiology"]
    assert out["expert"] == "XRayExpert" and out["checked"] == ["acme"]
    assert out["config"] == {"ffn": "kvlm", "acme": "acme-kvlm-experts"}
    assert out["loss"] > 0 and out["acme_trained"] and out["same"] < 1e-5

    missing = run_python(["-c", LOAD_WITHOUT_PLUGIN, str(path)])
    assert missing.returncode == 0, missing.stderr[-3000:]
    assert "pip install acme-kvlm-experts" in missing.stdout
