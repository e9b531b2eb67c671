"""kvlm-retail: conformance and discovery (kvlm.testing), the expert, the dataset."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kvlm.testing
import kvlm_retail
from kvlm_retail import dataset
from kvlm_retail.layers import RetailExpert


def test_plugin_conformance_and_discovery(tmp_path):
    found = kvlm.testing.check_plugin(kvlm_retail, tmp_path=tmp_path, distribution="kvlm-retail")
    assert [s.name for s in found["experts"]] == ["retail"]
    assert [s.name for s in found["datasets"]] == ["retail_shelves"]


def test_expert_reads_a_convex_mix_of_slots():
    layer = RetailExpert(d_model=16, hidden_dim=6, temperature=0.5)
    layer.build((None, 16))
    assert [tuple(w.shape) for w in layer.weights] == [(6, 16), (6, 16), (16,)]
    assert keras.saving.get_registered_name(RetailExpert) == "kvlm_retail>RetailExpert"
    values = keras.ops.convert_to_numpy(layer.values)
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    # Every output lies inside the box spanned by the value slots (a convex combination).
    assert np.all(y >= values.min(axis=0) - 1e-5) and np.all(y <= values.max(axis=0) + 1e-5)
    # A very low temperature picks a single slot.
    sharp = RetailExpert(d_model=16, hidden_dim=6, temperature=1e-4)
    sharp.build((None, 16))
    out = keras.ops.convert_to_numpy(sharp(x)).reshape(-1, 16)
    slots = keras.ops.convert_to_numpy(sharp.values)
    assert np.all(np.abs(out[:, None, :] - slots[None]).max(axis=-1).min(axis=1) < 1e-4)
    with pytest.raises(ValueError, match="Received: temperature=0"):
        RetailExpert(d_model=8, temperature=0)


def test_dataset_answers_and_vocabulary():
    examples = dataset.load("train", 600, seed=0)
    answers = {e.answer for e in examples}
    assert 10 <= len(answers) <= 20 and answers == set(dataset.ANSWERS)
    assert answers - {"yes", "no", "one", "two", "three"} <= set(kvlm_retail.VOCABULARY)


def test_dataset_images_show_what_the_labels_say():
    for example in dataset.load("validation", 60, seed=1):
        image = example.image.astype(int)
        for product in example.extra["products"]:
            board = (dataset.SHELVES.index(product["shelf"]) + 0.68) * 16
            x = int((dataset.PLACES.index(product["place"]) + 0.5) * 32 / 3)
            body = image[int(board) - 2, x]
            tag = image[int(board + 0.09 * 32), x]
            assert np.abs(body - dataset.COLORS[product["color"]]).max() < 45
            assert np.abs(tag - dataset.TAGS[product["sale"]]).max() < 30
        if example.question.startswith("how many products are on the top"):
            top = sum(p["shelf"] == "top" for p in example.extra["products"])
            assert example.answer == dataset.COUNTS[top]
