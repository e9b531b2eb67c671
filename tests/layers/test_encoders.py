import keras
import numpy as np
import pytest

from kvlm.layers import (
    CNNEncoder,
    FeedForward,
    FusionBlock,
    ModalityFusion,
    PatchEmbedding,
    ResidualConvBlock,
    TextEncoder,
    ViTEncoder,
)

IMAGES = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)


def _round_trip(layer, *args, **kwargs):
    """Rebuilds `layer` from its config with the same weights; outputs must match."""
    expected = keras.ops.convert_to_numpy(layer(*args, **kwargs))
    clone = layer.__class__.from_config(layer.get_config())
    clone(*args, **kwargs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(*args, **kwargs)), expected, atol=1e-6)
    return expected


def test_patch_embedding_shape_and_round_trip():
    layer = PatchEmbedding(32, 8, 24)
    out = _round_trip(layer, IMAGES)
    assert out.shape == (2, 16, 24)
    assert layer.compute_output_shape((2, 32, 32, 3)) == (2, 16, 24)


def test_patch_embedding_rejects_indivisible_patch():
    with pytest.raises(ValueError, match="patch_size=5"):
        PatchEmbedding(32, 5, 8)


def test_vit_encoder_shape_and_round_trip():
    layer = ViTEncoder(32, 4, 32, num_layers=2, num_heads=4, intermediate_dim=64)
    assert _round_trip(layer, IMAGES).shape == (2, 64, 32)
    assert len(layer.transformer_layers) == 2


def test_cnn_encoder_shape_and_round_trip():
    # A stride-2 stem and three stride-2 stages: 32 / 2**4 = 2, so a 2 x 2 grid of tokens.
    layer = CNNEncoder(32, 48, filters=16, num_stages=3)
    assert layer.num_tokens == 4
    assert _round_trip(layer, IMAGES).shape == (2, 4, 48)
    layer = CNNEncoder(32, 48, filters=16, num_stages=2)
    assert _round_trip(layer, IMAGES).shape == (2, 16, 48)


def test_cnn_encoder_rejects_bad_stages():
    with pytest.raises(ValueError, match="num_stages=6"):
        CNNEncoder(32, 16, num_stages=6)


def test_residual_block_checks_channels():
    with pytest.raises(ValueError, match="filters=8"):
        ResidualConvBlock(8).build((1, 4, 4, 3))


def test_text_encoder_padding_is_masked():
    layer = TextEncoder(50, 8, 16, num_layers=2, num_heads=2, intermediate_dim=32)
    ids = np.array([[4, 5, 6, 0, 0, 0, 0, 0]], dtype="int32")
    out = keras.ops.convert_to_numpy(layer(ids))
    assert out.shape == (1, 8, 16)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.compute_mask(ids)), [[True] * 3 + [False] * 5]
    )
    # Real tokens never attend to padding: a longer real prefix changes them, padding does not.
    ids_more = np.array([[4, 5, 6, 7, 0, 0, 0, 0]], dtype="int32")
    out_more = keras.ops.convert_to_numpy(layer(ids_more))
    assert np.abs(out_more[0, :3] - out[0, :3]).max() > 1e-4
    _round_trip(layer, ids)


def test_modality_fusion_sequence_mask_and_modality():
    layer = ModalityFusion(8)
    image_tokens = np.ones((2, 4, 8), "float32")
    text_tokens = np.zeros((2, 3, 8), "float32")
    text_mask = np.array([[True, True, False], [True, False, False]])
    tokens, mask, modality = layer(image_tokens, text_tokens, text_mask)
    assert tuple(tokens.shape) == (2, 8, 8)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(mask),
        [[True] * 5 + [True, True, False], [True] * 5 + [True, False, False]],
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(modality)[0], [2, 0, 0, 0, 0, 1, 1, 1])


def test_fusion_block_ignores_masked_tokens():
    block = FusionBlock(16, 4, 32)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 6, 16)).astype("float32")
    mask = np.array([[True, True, True, True, False, False]])
    out = keras.ops.convert_to_numpy(block(x, padding_mask=mask))
    x_changed = x.copy()
    x_changed[0, 4:] = rng.normal(size=(2, 16)) * 10
    out_changed = keras.ops.convert_to_numpy(block(x_changed, padding_mask=mask))
    np.testing.assert_allclose(out_changed[0, :4], out[0, :4], atol=1e-5)
    # Without the mask the same change reaches the real tokens.
    unmasked = keras.ops.convert_to_numpy(block(x_changed))
    assert np.abs(unmasked[0, :4] - out[0, :4]).max() > 1e-3


def test_fusion_block_round_trip_and_validation():
    block = FusionBlock(16, 4, 32)
    x = np.random.default_rng(2).normal(size=(2, 5, 16)).astype("float32")
    _round_trip(block, x)
    with pytest.raises(ValueError, match="num_heads=3"):
        FusionBlock(16, 3, 32)


def test_feed_forward_shape():
    layer = FeedForward(8, 32)
    assert tuple(layer(np.zeros((2, 3, 8), "float32")).shape) == (2, 3, 8)
