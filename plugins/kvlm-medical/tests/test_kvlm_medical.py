"""kvlm-medical: conformance (kvlm.testing), discovery, the expert's options, the dataset."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kvlm.experts
import kvlm.testing
import kvlm_medical
from kvlm_medical import dataset
from kvlm_medical.layers import MedicalExpert


def test_plugin_conformance(tmp_path):
    found = kvlm.testing.check_plugin(kvlm_medical, tmp_path=tmp_path)
    assert [s.name for s in found["experts"]] == ["medical"]
    assert [s.name for s in found["datasets"]] == ["medical_scans"]


def test_discovered_through_its_entry_point():
    info = kvlm.experts.available()["medical"]
    assert (info.distribution, info.version) == ("kvlm-medical", kvlm_medical.__version__)
    assert info.spec.domain == "medical"
    assert kvlm.experts.datasets()["medical_scans"].distribution == "kvlm-medical"
    assert isinstance(kvlm.experts.build_expert("medical", d_model=8), MedicalExpert)


def test_expert_is_a_gated_ffn():
    layer = MedicalExpert(d_model=16, hidden_dim=32)
    layer.build((None, 16))
    assert [tuple(w.shape) for w in layer.weights] == [(16, 32), (32,), (16, 32), (32, 16)]
    assert layer.count_params() == 16 * 32 + 32 + 16 * 32 + 32 * 16
    assert MedicalExpert(d_model=12).gate.units == 32  # 8 * 12 // 3
    assert keras.saving.get_registered_name(MedicalExpert) == "kvlm_medical>MedicalExpert"
    # The gate multiplies: zeroing the up projection silences the expert.
    layer.up.kernel.assign(np.zeros((16, 32), "float32"))
    y = keras.ops.convert_to_numpy(layer(np.ones((2, 3, 16), "float32")))
    np.testing.assert_allclose(y, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 0}, "Received: d_model=0"),
        ({"d_model": 8, "hidden_dim": -1}, "Received: hidden_dim=-1"),
        ({"d_model": 8, "dropout": 1.0}, "Received: dropout=1.0"),
        ({"d_model": 8, "activation": len}, "Received: activation="),
    ],
)
def test_expert_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedicalExpert(**kwargs)


def test_expert_rejects_the_wrong_width():
    with pytest.raises(ValueError, match="Expected last dimension d_model=8"):
        MedicalExpert(d_model=8)(np.zeros((1, 2, 4), "float32"))


def test_dataset_answers_and_vocabulary():
    examples = kvlm_medical.load_dataset("train", 600, seed=0)
    answers = {e.answer for e in examples}
    assert 10 <= len(answers) <= 20 and answers == set(dataset.ANSWERS)
    assert answers - {"yes", "no", "one", "two", "three"} <= set(kvlm_medical.VOCABULARY)
    assert {e.domain for e in examples} == {"medical"}
    questions = {e.question.split(" the ")[0] for e in examples}
    assert len(questions) >= 5


def test_dataset_images_show_what_the_labels_say():
    for example in kvlm_medical.load_dataset("validation", 50, seed=1):
        image = example.image.astype(int)
        lesions = {x["organ"]: x for x in example.extra["lesions"]}
        assert example.caption.count(" in the ") == len(lesions)
        for organ, ((fx, fy), tint) in dataset.ORGAN_LAYOUT.items():
            centre = image[int(fy * 32), int(fx * 32)]
            expected = dataset.LESIONS[lesions[organ]["kind"]] if organ in lesions else tint
            assert np.abs(centre - expected).max() < 45, (organ, centre, expected)


def test_dataset_image_size_and_validation():
    examples = kvlm_medical.load_dataset("train", 3, seed=0, image_size=48)
    assert all(e.image.shape == (48, 48, 3) and e.image.dtype == np.uint8 for e in examples)
    with pytest.raises(ValueError, match="Received: image_size=16"):
        kvlm_medical.load_dataset("train", 3, seed=0, image_size=16)
    with pytest.raises(ValueError, match="Received: size=-1"):
        kvlm_medical.load_dataset("train", -1, seed=0)
