"""`VLMPreprocessor` held by task models, the `.keras` file and keras-hub's preset layout."""

from __future__ import annotations

import json

import keras
import keras_hub
import numpy as np
import pytest
from harness import run_model_saving_test

from kvlm.data import make_tokenizer, resize_image
from kvlm.models import Captioner, DualEncoder, VLMClassifier, VLMPreprocessor

ANSWERS = ["circle", "square", "triangle"]


@pytest.fixture
def preprocessor(vocabulary):
    return VLMPreprocessor(make_tokenizer(vocabulary, 16), 32, answers=ANSWERS)


@pytest.fixture
def raw(shapes_examples):
    examples = shapes_examples[:3]
    return np.stack([e.image for e in examples]), [e.question for e in examples]


def test_preprocess_makes_model_inputs_and_decodes_answers(preprocessor, tokenizer, raw):
    images, questions = raw
    inputs = preprocessor.preprocess(images, questions)
    # Already 32 px: resizing keeps the pixels, scaled to [0, 1].
    np.testing.assert_allclose(keras.ops.convert_to_numpy(inputs["images"]), images / 255.0, atol=1e-6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(inputs["token_ids"]), np.asarray(tokenizer(questions)))
    # A larger image is resized as the training pipeline resizes it.
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    resized = keras.ops.convert_to_numpy(preprocessor.preprocess(big, questions)["images"])
    assert resized.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(resized, np.stack([resize_image(image, 32).numpy() for image in big]), atol=1e-5)
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.1]])
    assert preprocessor.decode_answers(logits) == ["square", "circle", "triangle"]


def test_model_carries_its_preprocessor_through_the_keras_file(tmp_path, preprocessor, raw):
    model = VLMClassifier.from_preset(
        "kvlm_tiny", num_classes=3, vocabulary_size=preprocessor.tokenizer.vocabulary_size(), encoder="cnn",
        preprocessor=preprocessor,
    )
    inputs = preprocessor.preprocess(*raw)
    loaded = run_model_saving_test(model, inputs, tmp_path / "model.keras")
    # model.keras alone is enough to read raw inputs and name the answers.
    again = loaded.preprocessor.preprocess(*raw)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again["token_ids"]), inputs["token_ids"])
    assert loaded.preprocessor.tokenizer.get_vocabulary() == preprocessor.tokenizer.get_vocabulary()
    logits = loaded.predict(again, verbose=0)
    assert loaded.preprocessor.decode_answers(logits) == model.preprocessor.decode_answers(logits)


def test_save_to_preset_writes_keras_hub_layout_and_from_preset_reads_it(tmp_path, preprocessor, raw):
    model = VLMClassifier.from_preset(
        "kvlm_tiny", num_classes=3, vocabulary_size=preprocessor.tokenizer.vocabulary_size(), encoder="cnn",
        preprocessor=preprocessor,
    )
    model.save_to_preset(tmp_path / "preset")
    files = sorted(str(p.relative_to(tmp_path / "preset")) for p in (tmp_path / "preset").rglob("*") if p.is_file())
    assert files == [
        "assets/tokenizer/vocabulary.txt", "config.json", "metadata.json", "model.weights.h5",
        "preprocessor.json", "tokenizer.json",
    ]
    metadata = json.loads((tmp_path / "preset" / "metadata.json").read_text())
    assert metadata["parameter_count"] == model.count_params()
    assert {"keras_version", "keras_hub_version", "date_saved"} <= set(metadata)
    vocabulary = (tmp_path / "preset" / "assets/tokenizer/vocabulary.txt").read_text().split("\n")[:-1]
    assert vocabulary == preprocessor.tokenizer.get_vocabulary()

    loaded = VLMClassifier.from_preset(tmp_path / "preset")
    inputs = preprocessor.preprocess(*raw)
    np.testing.assert_array_equal(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0))
    assert loaded.preprocessor.answers == ANSWERS and loaded.preprocessor.image_size == 32
    # keras-hub reads the tokenizer of the folder on its own.
    from keras_hub.src.utils.preset_utils import load_json

    assert load_json(str(tmp_path / "preset"), "tokenizer.json")["class_name"] == "WordPieceTokenizer"


def test_every_task_model_saves_to_a_preset(tmp_path, vocabulary, raw):
    text_only = VLMPreprocessor(make_tokenizer(vocabulary, 16), 32)
    for cls in (DualEncoder, Captioner):
        model = cls.from_preset("kvlm_tiny", vocabulary_size=len(vocabulary), encoder="cnn", preprocessor=text_only)
        model.save_to_preset(tmp_path / cls.__name__)
        loaded = cls.from_preset(tmp_path / cls.__name__)
        inputs = text_only.preprocess(*raw)
        keras.tree.map_structure(
            np.testing.assert_array_equal, loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
        )
        assert loaded.preprocessor.answers == []
    with pytest.raises(ValueError, match="holds a Captioner, not a DualEncoder"):
        DualEncoder.from_preset(tmp_path / "Captioner")


def test_errors_name_the_problem(vocabulary, preprocessor):
    with pytest.raises(ValueError, match="needs `num_classes`, `vocabulary_size`"):
        VLMClassifier.from_preset("kvlm_tiny")
    with pytest.raises(ValueError, match="needs `vocabulary_size`"):
        DualEncoder.from_preset("kvlm_tiny")
    with pytest.raises(ValueError, match=r"\(image_size, sequence_length\) \(64, 32\)"):
        VLMClassifier.from_preset(
            "kvlm_small", num_classes=3, vocabulary_size=len(vocabulary), encoder="cnn", preprocessor=preprocessor
        )
    with pytest.raises(ValueError, match="distinct"):
        VLMPreprocessor(make_tokenizer(vocabulary, 16), 32, answers=["a", "a"])
    with pytest.raises(ValueError, match="sequence_length=None"):
        VLMPreprocessor(keras_hub.tokenizers.WordPieceTokenizer(vocabulary=vocabulary), 32)
    with pytest.raises(ValueError, match="does not classify"):
        VLMPreprocessor(make_tokenizer(vocabulary, 16), 32).decode_answers(np.zeros((1, 2)))
