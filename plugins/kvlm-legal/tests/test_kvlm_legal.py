"""kvlm-legal: conformance (kvlm.testing), discovery, the expert's options, the dataset."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kvlm.experts
import kvlm.testing
import kvlm_legal
from kvlm_legal import dataset
from kvlm_legal.layers import LegalExpert


def test_plugin_conformance(tmp_path):
    found = kvlm.testing.check_plugin(kvlm_legal, tmp_path=tmp_path)
    assert [s.name for s in found["experts"]] == ["legal"]
    assert [s.name for s in found["datasets"]] == ["legal_documents"]


def test_conformance_with_options(tmp_path):
    spec = kvlm.experts.available()["legal"].spec
    layer = kvlm.testing.check_expert(spec, d_model=8, options={"rank": 8, "hidden_dim": 4}, tmp_path=tmp_path)
    assert layer.get_config()["rank"] == 8


def test_discovered_through_its_entry_point():
    info = kvlm.experts.available()["legal"]
    assert (info.distribution, info.version) == ("kvlm-legal", kvlm_legal.__version__)
    assert info.spec.domain == "legal"
    assert kvlm.experts.datasets()["legal_documents"].distribution == "kvlm-legal"
    assert isinstance(kvlm.experts.build_expert("legal", d_model=8, rank=2), LegalExpert)


def test_expert_adds_a_low_rank_path():
    layer = LegalExpert(d_model=16, hidden_dim=8, rank=3)
    layer.build((None, 16))
    assert layer.count_params() == (16 * 8 + 8) + (8 * 16 + 16) + 16 * 3 + 3 * 16
    assert keras.saving.get_registered_name(LegalExpert) == "kvlm_legal>LegalExpert"
    # With the feed-forward output zeroed, the expert is exactly the rank-3 linear map.
    layer.outer.kernel.assign(np.zeros((8, 16), "float32"))
    x = np.random.default_rng(0).normal(size=(40, 16)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    assert np.linalg.matrix_rank(y, tol=1e-4) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": -2}, "Received: d_model=-2"),
        ({"d_model": 8, "rank": 0}, "Received: rank=0"),
        ({"d_model": 8, "rank": 9}, "Received: rank=9"),
        ({"d_model": 8, "hidden_dim": 0}, "Received: hidden_dim=0"),
        ({"d_model": 8, "dropout": -0.1}, "Received: dropout=-0.1"),
    ],
)
def test_expert_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LegalExpert(**kwargs)


def test_dataset_answers_and_vocabulary():
    examples = kvlm_legal.load_dataset("train", 600, seed=0)
    answers = {e.answer for e in examples}
    assert 10 <= len(answers) <= 20 and answers == set(dataset.ANSWERS)
    assert answers - {"yes", "no", "one", "two", "three"} <= set(kvlm_legal.VOCABULARY)
    assert {e.domain for e in examples} == {"legal"}


def _centre(cell, size=32):
    x0, y0, w, h = dataset._cell_box(cell, size)
    return int(y0 + h / 2), int(x0 + w / 2)


def test_dataset_images_show_what_the_labels_say():
    for example in kvlm_legal.load_dataset("validation", 60, seed=1):
        image = example.image.astype(int)
        document = example.extra["document"]
        seal = document["seal"]
        if seal is not None:
            assert np.abs(image[_centre(seal["cell"])] - dataset.SEALS[seal["color"]]).max() < 45
        empty = {(r, c) for r in range(3) for c in range(2)} - set(document["clauses"])
        empty -= {x["cell"] for x in (document["signature"], seal) if x is not None}
        for cell in empty:
            assert np.abs(image[_centre(cell)] - dataset.PAGE).max() < 30
        if example.question == "is the document signed":
            assert example.answer == ("yes" if document["signature"] else "no")


def test_dataset_image_size_and_validation():
    examples = kvlm_legal.load_dataset("train", 3, seed=0, image_size=64)
    assert all(e.image.shape == (64, 64, 3) and e.image.dtype == np.uint8 for e in examples)
    with pytest.raises(ValueError, match="Received: image_size=8"):
        kvlm_legal.load_dataset("train", 3, seed=0, image_size=8)
