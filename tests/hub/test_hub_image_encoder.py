"""keras-hub vision backbones as kvlm's image encoder, loaded by path from preset folders saved here
(the code a Kaggle or Hugging Face handle takes), on every backend."""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
import pytest

from hub_presets import FAMILIES, OFFSET, SCALE, SIZE, resnet, save_preset, vit

from kvlm.hub import HubImageEncoder
from kvlm.models.classifier import VLMClassifier

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def preset(request, tmp_path_factory):
    """`(family, folder, backbone)`: a tiny backbone of the family and its image converter saved
    with keras-hub's `save_to_preset`."""
    folder, backbone = save_preset(request.param, tmp_path_factory.mktemp(request.param) / "preset")
    return request.param, folder, backbone


def _tower(backbone):
    return getattr(backbone, "vision_encoder", None) or backbone


def test_the_encoder_is_the_presets_tower_with_its_weights_and_converter(preset):
    family, folder, backbone = preset
    _, _, tokens, width = FAMILIES[family]
    encoder = HubImageEncoder.from_preset(folder, hidden_dim=24)
    assert encoder.image_size == SIZE and np.allclose(encoder.scale, SCALE) and np.allclose(encoder.offset, OFFSET)
    images = RNG.random((2, SIZE, SIZE, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(encoder(images))
    assert out.shape == (2, tokens, 24)
    # The tower's own tokens, from the pixels scaled as its converter scales them, then projected.
    pixels = images * 255.0 * np.float32(SCALE) + np.float32(OFFSET)
    tower = _tower(backbone)
    own = keras.ops.convert_to_numpy(encoder.tokens({"images": pixels} if isinstance(tower.input, dict) else pixels))
    own = own.reshape(2, tokens, width)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in encoder.projection.weights)
    np.testing.assert_allclose(out, own @ kernel + bias, rtol=1e-4, atol=1e-4)
    saved, loaded = tower.weights, encoder.backbone.weights
    assert len(saved) == len(loaded) and all(
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)) for a, b in zip(saved, loaded))


def test_a_classifier_on_the_preset_trains_and_round_trips(preset, tmp_path):
    family, folder, _ = preset
    model = VLMClassifier.from_preset("kvlm_tiny", num_classes=4, vocabulary_size=40, image_encoder=folder)
    assert model.backbone.image_size == SIZE
    images = RNG.random((64, SIZE, SIZE, 3)).astype("float32")
    token_ids = RNG.integers(1, 40, (64, 16)).astype("int32")
    labels = (images.mean(axis=(1, 2, 3)) > 0.5).astype("int32") + 2 * (token_ids[:, 0] > 20)
    inputs = {"images": images, "token_ids": token_ids}
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = model.fit(inputs, labels, batch_size=16, epochs=4, verbose=0).history["loss"]
    assert losses[-1] < 0.9 * losses[0], (family, losses)
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(restored.predict(inputs, verbose=0), model.predict(inputs, verbose=0), atol=1e-5)


def test_encoders_that_do_not_fit_are_refused_by_name():
    bert = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
                                         intermediate_dim=32, max_sequence_length=8)
    with pytest.raises(ValueError, match="outputs tokens .* Received: BertBackbone"):
        HubImageEncoder(bert, hidden_dim=16)
    with pytest.raises(ValueError, match=r"takes \(32\)\. Received: image_size=64"):
        HubImageEncoder(vit(), hidden_dim=16, image_size=64)
    with pytest.raises(ValueError, match=r"takes \(any size\)\. Received: image_size=None"):
        HubImageEncoder(resnet(), hidden_dim=16)
    with pytest.raises(ValueError, match=r"`scale` must be a finite float or one per channel. Received: scale=\[1, 2\]"):
        HubImageEncoder(vit(), hidden_dim=16, scale=[1, 2])
    with pytest.raises(ValueError, match="`image_encoder` must be a keras-hub preset handle"):
        VLMClassifier.from_preset("kvlm_tiny", num_classes=4, vocabulary_size=40, image_encoder=3)
