"""kvlm-retail: conformance (kvlm.testing), discovery, the expert's options, the dataset."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kvlm.experts
import kvlm.testing
import kvlm_retail
from kvlm_retail import dataset
from kvlm_retail.layers import RetailExpert


def test_plugin_conformance(tmp_path):
    found = kvlm.testing.check_plugin(kvlm_retail, tmp_path=tmp_path)
    assert [s.name for s in found["experts"]] == ["retail"]
    assert [s.name for s in found["datasets"]] == ["retail_shelves"]


def test_discovered_through_its_entry_point():
    info = kvlm.experts.available()["retail"]
    assert (info.distribution, info.version) == ("kvlm-retail", kvlm_retail.__version__)
    assert info.spec.domain == "retail"
    assert kvlm.experts.datasets()["retail_shelves"].distribution == "kvlm-retail"
    assert isinstance(kvlm.experts.build_expert("retail", d_model=8, hidden_dim=5), RetailExpert)


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 0}, "Received: d_model=0"),
        ({"d_model": 8, "hidden_dim": 2.5}, "Received: hidden_dim=2.5"),
        ({"d_model": 8, "temperature": 0}, "Received: temperature=0"),
        ({"d_model": 8, "dropout": 2}, "Received: dropout=2"),
    ],
)
def test_expert_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetailExpert(**kwargs)


def test_dataset_answers_and_vocabulary():
    examples = kvlm_retail.load_dataset("train", 600, seed=0)
    answers = {e.answer for e in examples}
    assert 10 <= len(answers) <= 20 and answers == set(dataset.ANSWERS)
    assert answers - {"yes", "no", "one", "two", "three"} <= set(kvlm_retail.VOCABULARY)
    assert {e.domain for e in examples} == {"retail"}


def test_dataset_images_show_what_the_labels_say():
    for example in kvlm_retail.load_dataset("validation", 60, seed=1):
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


def test_dataset_image_size_and_validation():
    examples = kvlm_retail.load_dataset("train", 3, seed=0, image_size=40)
    assert all(e.image.shape == (40, 40, 3) and e.image.dtype == np.uint8 for e in examples)
    with pytest.raises(ValueError, match="Received: image_size=20"):
        kvlm_retail.load_dataset("train", 3, seed=0, image_size=20)
