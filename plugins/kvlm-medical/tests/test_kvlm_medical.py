"""kvlm-medical: conformance and discovery (kvlm.testing), the expert, the dataset."""

from __future__ import annotations

import keras
import numpy as np

import kvlm.testing
import kvlm_medical
from kvlm_medical import dataset
from kvlm_medical.layers import MedicalExpert


def test_plugin_conformance_and_discovery(tmp_path):
    found = kvlm.testing.check_plugin(kvlm_medical, tmp_path=tmp_path, distribution="kvlm-medical")
    assert [s.name for s in found["experts"]] == ["medical"]
    assert [s.name for s in found["datasets"]] == ["medical_scans"]


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


def test_dataset_answers_and_vocabulary():
    examples = dataset.load("train", 600, seed=0)
    answers = {e.answer for e in examples}
    assert 10 <= len(answers) <= 20 and answers == set(dataset.ANSWERS)
    assert answers - {"yes", "no", "one", "two", "three"} <= set(kvlm_medical.VOCABULARY)
    assert len({e.question.split(" the ")[0] for e in examples}) >= 5


def test_dataset_images_show_what_the_labels_say():
    for example in dataset.load("validation", 50, seed=1):
        image = example.image.astype(int)
        lesions = {x["organ"]: x for x in example.extra["lesions"]}
        assert example.caption.count(" in the ") == len(lesions)
        for organ, ((fx, fy), tint) in dataset.ORGAN_LAYOUT.items():
            centre = image[int(fy * 32), int(fx * 32)]
            expected = dataset.LESIONS[lesions[organ]["kind"]] if organ in lesions else tint
            assert np.abs(centre - expected).max() < 45, (organ, centre, expected)
