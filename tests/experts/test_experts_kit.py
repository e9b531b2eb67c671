"""The plugin kit: lazy "module:attr" references, the ExpertLayer base, ProceduralDataset."""

from __future__ import annotations

import inspect
import json

import keras
import numpy as np
import pytest

import kvlm.testing
from kvlm.experts import DatasetSpec, ExpertSpec, Reference
from kvlm.experts.layer import ExpertLayer
from kvlm.experts.procedural import ProceduralDataset


def test_discovery_with_references_imports_no_keras(run_python):
    code = """
import json, sys
import kvlm.experts
specs = {n: type(i.spec.build).__name__ for n, i in kvlm.experts.available().items()}
loads = {n: type(i.spec.load).__name__ for n, i in kvlm.experts.datasets().items()}
print(json.dumps({"keras": "keras" in sys.modules, "numpy": "numpy" in sys.modules, "specs": specs, "loads": loads}))
"""
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["keras"], out["numpy"]) == (False, False)
    assert set(out["specs"].values()) == {"Reference"} and set(out["loads"].values()) == {"Reference"}


def test_reference_resolves_calls_and_has_the_target_signature():
    ref = Reference("kvlm.experts.builtin:FFNExpert")
    assert ref.module == "kvlm.experts.builtin" and str(ref) == "kvlm.experts.builtin:FFNExpert"
    layer = ref(d_model=8, hidden_dim=4)
    assert type(layer).__name__ == "FFNExpert" and layer.inner.units == 4
    assert list(inspect.signature(Reference("kvlm_medical.dataset:load")).parameters)[-1] == "image_size"
    assert Reference("kvlm.experts.reference:Reference.resolve").resolve() is Reference.resolve
    with pytest.raises(AttributeError, match="NoSuchExpert"):
        Reference("kvlm.experts.builtin:NoSuchExpert")(d_model=8)


@pytest.mark.parametrize("target", ["kvlm.experts.builtin", "a:b:c", ":FFNExpert", "x y:z"])
def test_specs_reject_malformed_references(target):
    with pytest.raises(ValueError, match=r'must be callable or a "module:attr" string. Received: build='):
        ExpertSpec("x", "y", target)
    with pytest.raises(ValueError, match=r'must be callable or a "module:attr" string. Received: load='):
        DatasetSpec("x", "y", "", target)
    assert isinstance(ExpertSpec("x", "y", "kvlm.experts.builtin:FFNExpert").build, Reference)


@keras.saving.register_keras_serializable(package="kvlm_kit_tests")
class _Scale(ExpertLayer):
    """The smallest ExpertLayer: one weight vector, no config of its own."""

    def build(self, input_shape):
        super().build(input_shape)
        self.scale = self.add_weight(shape=(self.d_model,), initializer="ones", name="scale")

    def call(self, x, training=None):
        return self.dropout_layer(x * self.scale, training=training)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 0}, "Received: d_model=0"),
        ({"d_model": True}, "Received: d_model=True"),
        ({"d_model": 8, "hidden_dim": 2.5}, "Received: hidden_dim=2.5"),
        ({"d_model": 8, "dropout": 1.0}, "Received: dropout=1.0"),
    ],
)
def test_expert_layer_validates_the_common_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _Scale(**kwargs)


def test_expert_layer_checks_width_keeps_shape_and_config(tmp_path):
    with pytest.raises(ValueError, match=r"Expected inputs with last dimension d_model=8. Received: input_shape"):
        _Scale(d_model=8)(np.zeros((1, 2, 4), "float32"))
    with pytest.raises(ValueError, match="Received: activation=<built-in function len>"):
        ExpertLayer.check_activation(len)
    layer = _Scale(d_model=6, hidden_dim=3, dropout=0.25)
    assert layer.compute_output_shape((None, 5, 6)) == (None, 5, 6)
    config = layer.get_config()
    assert (config["d_model"], config["hidden_dim"], config["dropout"]) == (6, 3, 0.25)
    assert isinstance(kvlm.testing.check_expert(_Scale, d_model=6, tmp_path=tmp_path), _Scale)


def _scene(rng):
    return {"count": int(rng.integers(1, 4)), "shade": int(rng.integers(0, 256))}


def _render(scene, image_size, rng):
    image = np.full((image_size, image_size, 3), scene["shade"], np.uint8)
    image[: scene["count"], 0] = int(rng.integers(256))
    return image


TOY = ProceduralDataset(
    domain="toy",
    scene=_scene,
    question=lambda scene, rng: ("how many", str(scene["count"])),
    caption=lambda scene: f"{scene['count']} marks",
    render=_render,
    extra_key="marks",
    min_image_size=4,
)


def test_procedural_dataset_draws_deterministic_examples():
    examples = TOY("train", 50, seed=3, image_size=6)
    assert len(examples) == 50 and {e.domain for e in examples} == {"toy"}
    assert all(e.image.shape == (6, 6, 3) and e.image.dtype == np.uint8 for e in examples)
    assert all(e.answer == str(e.extra["marks"]["count"]) == e.caption.split()[0] for e in examples)
    assert all(int(e.image[-1, -1, 0]) == e.extra["marks"]["shade"] for e in examples)
    again = TOY("train", 50, seed=3, image_size=6)
    assert all(np.array_equal(a.image, b.image) and a.extra == b.extra for a, b in zip(examples, again))
    other = TOY("test", 50, seed=3, image_size=6)
    assert [e.extra for e in other] != [e.extra for e in examples]
    assert "image_size" in inspect.signature(TOY).parameters
    with pytest.raises(ValueError, match="must be >= 4 to draw toy images. Received: image_size=3"):
        TOY("train", 1, seed=0, image_size=3)
    with pytest.raises(ValueError, match="Received: size=-1"):
        TOY("train", -1, seed=0)
