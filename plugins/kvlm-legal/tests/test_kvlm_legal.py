"""kvlm-legal: conformance and discovery (kvlm.testing), the expert's options, the dataset."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kvlm.testing
import kvlm_legal
from kvlm_legal import dataset
from kvlm_legal.layers import LegalExpert


def test_plugin_conformance_and_discovery(tmp_path):
    found = kvlm.testing.check_plugin(kvlm_legal, tmp_path=tmp_path, distribution="kvlm-legal")
    assert [s.name for s in found["experts"]] == ["legal"]
    assert [s.name for s in found["datasets"]] == ["legal_documents"]
    layer = kvlm.testing.check_expert(found["experts"][0], d_model=8, options={"rank": 8, "hidden_dim": 4})
    assert layer.get_config()["rank"] == 8


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
    for rank in (0, 9):
        with pytest.raises(ValueError, match=f"Received: rank={rank}"):
            LegalExpert(d_model=8, rank=rank)


def test_dataset_answers_and_vocabulary():
    examples = dataset.load("train", 600, seed=0)
    answers = {e.answer for e in examples}
    assert 10 <= len(answers) <= 20 and answers == set(dataset.ANSWERS)
    assert answers - {"yes", "no", "one", "two", "three"} <= set(kvlm_legal.VOCABULARY)


def _centre(cell, size=32):
    x0, y0, w, h = dataset._cell_box(cell, size)
    return int(y0 + h / 2), int(x0 + w / 2)


def test_dataset_images_show_what_the_labels_say():
    for example in dataset.load("validation", 60, seed=1):
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
