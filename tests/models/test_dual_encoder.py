"""`kvlm.models.DualEncoder`: contrastive losses, embeddings, saving, training and
retrieval, and the exported `embed` signature.

Positives: an image and a caption match when the caption is identical to the image's
own caption (the shapes dataset repeats captions), both in training (pair ids are
caption ids) and in retrieval (`recall_at_k(..., captions=...)`).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from harness import caption_split, run_task_test

from kvlm.data import caption_ids, make_pair_dataset, png_bytes
from kvlm.layers import CNNEncoder, TextEncoder, ViTEncoder
from kvlm.models import CLIPLoss, ContrastiveLogits, DualEncoder, SigLIPLoss
from kvlm.models.contrastive import DEFAULT_TEMPERATURE
from kvlm.models.retrieval import (
    chance_recall_at_k,
    embed_images,
    embed_pairs,
    embed_texts,
    recall_at_k,
)

pytestmark = pytest.mark.long


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_clip(logits, ids):
    """CLIP loss by hand: each row and column is a cross-entropy against its positives."""
    n = len(ids)
    total = 0.0
    for k in range(n):
        row = logits[k]
        row_log_p = row - np.log(np.sum(np.exp(row)))
        column = logits[:, k]
        column_log_p = column - np.log(np.sum(np.exp(column)))
        same = [j for j in range(n) if ids[j] == ids[k]]
        image_to_text = -np.mean([row_log_p[j] for j in same])
        text_to_image = -np.mean([column_log_p[i] for i in same])
        total += 0.5 * (image_to_text + text_to_image)
    return total / n


def _np_siglip(logits, ids):
    """SigLIP loss by hand: -(1/n) sum_ij log sigmoid(label_ij * z_ij)."""
    n = len(ids)
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if ids[i] == ids[j] else -1.0
            total += -np.log(1.0 / (1.0 + np.exp(-label * logits[i, j])))
    return total / n


@pytest.fixture
def small_embeddings():
    rng = np.random.default_rng(0)
    return _unit(rng.normal(size=(5, 8))).astype("float32"), _unit(rng.normal(size=(5, 8))).astype("float32")


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4], [7, 3, 7, 1, 3]], ids=["distinct", "repeated"])
def test_loss_values_match_numpy(small_embeddings, ids):
    images, texts = small_embeddings
    ids = np.array(ids, dtype="int32")
    similarity = images @ texts.T

    clip_head = ContrastiveLogits(initial_temperature=0.2)
    clip_head.build()
    logits = keras.ops.convert_to_numpy(clip_head(images, texts))
    np.testing.assert_allclose(logits, similarity / 0.2, rtol=1e-5, atol=1e-5)
    clip = float(keras.ops.convert_to_numpy(CLIPLoss()(ids, logits)))
    np.testing.assert_allclose(clip, _np_clip(similarity / 0.2, ids), rtol=1e-5)

    siglip_head = ContrastiveLogits(initial_temperature=0.5, initial_bias=-1.5)
    siglip_head.build()
    logits = keras.ops.convert_to_numpy(siglip_head(images, texts))
    np.testing.assert_allclose(logits, similarity / 0.5 - 1.5, rtol=1e-5, atol=1e-5)
    siglip = float(keras.ops.convert_to_numpy(SigLIPLoss()(ids, logits)))
    np.testing.assert_allclose(siglip, _np_siglip(similarity / 0.5 - 1.5, ids), rtol=1e-5)

    # Without repeated ids the CLIP loss is the textbook mean of the diagonal cross-entropies.
    if len(set(ids.tolist())) == len(ids):
        z = similarity / 0.2
        rows = -np.mean(np.diag(z) - np.log(np.exp(z).sum(axis=1)))
        columns = -np.mean(np.diag(z) - np.log(np.exp(z).sum(axis=0)))
        np.testing.assert_allclose(clip, 0.5 * (rows + columns), rtol=1e-5)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_model_loss_uses_learned_temperature_and_bias(small_embeddings, loss):
    images, texts = small_embeddings
    model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=40, embedding_dim=8, loss=loss)
    model.logit_head.log_temperature.assign(np.log(0.25))
    if loss == "siglip":
        model.logit_head.logit_bias.assign(-2.0)
    ids = np.array([4, 4, 0, 1, 2], dtype="int32")
    y_pred = {"image_embedding": images, "text_embedding": texts}
    value = float(keras.ops.convert_to_numpy(model.compute_loss(y=ids, y_pred=y_pred)))
    z = images @ texts.T / 0.25
    expected = _np_clip(z, ids) if loss == "clip" else _np_siglip(z - 2.0, ids)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # Without pair ids, only the diagonal is positive.
    value = float(keras.ops.convert_to_numpy(model.compute_loss(y=None, y_pred=y_pred)))
    distinct = np.arange(5)
    expected = _np_clip(z, distinct) if loss == "clip" else _np_siglip(z - 2.0, distinct)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(model.temperature, 0.25, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_embeddings_are_unit_norm(encoder, tiny_inputs):
    model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=60, embedding_dim=24, encoder=encoder)
    outputs = model(tiny_inputs)
    assert set(outputs) == {"image_embedding", "text_embedding"}
    for name in outputs:
        values = keras.ops.convert_to_numpy(outputs[name])
        assert values.shape == (3, 24) and values.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, rtol=1e-5)
    # Parameter counts of the tiny preset (encoders, projections, log-temperature).
    assert model.count_params() == {"vit": 88_513, "cnn": 101_185}[encoder]
    # The towers give the same embeddings on their own.
    np.testing.assert_allclose(
        embed_images(model, tiny_inputs["images"]), keras.ops.convert_to_numpy(outputs["image_embedding"]),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        embed_texts(model, tiny_inputs["token_ids"]), keras.ops.convert_to_numpy(outputs["text_embedding"]),
        atol=1e-5,
    )


def test_text_embedding_pools_non_padding_tokens(tiny_inputs):
    model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=60)
    token_ids = np.concatenate([tiny_inputs["token_ids"], np.zeros((1, 16), "int32")])
    tokens = keras.ops.convert_to_numpy(model.get_layer("text_encoder")(token_ids))
    kernel = keras.ops.convert_to_numpy(model.get_layer("text_projection").kernel)
    mask = token_ids != 0
    pooled = np.stack([tokens[i][mask[i]].mean(axis=0) for i in range(3)])
    actual = embed_texts(model, token_ids)
    np.testing.assert_allclose(actual[:3], _unit(pooled @ kernel), atol=1e-5)
    # A text of padding only embeds to zeros, not NaN.
    np.testing.assert_array_equal(actual[3], 0.0)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_task_shapes_fit_and_keras_file(tmp_path, tiny_inputs, loss):
    model = DualEncoder.from_preset(
        "kvlm_tiny", vocabulary_size=60, embedding_dim=16, loss=loss, encoder="cnn", image_pooling="attention"
    )
    shape = (3, 16)
    loaded = run_task_test(
        model, tiny_inputs, expected_output_shape={"image_embedding": shape, "text_embedding": shape},
        tmp_path=tmp_path, compile_kwargs={"optimizer": keras.optimizers.Adam(3e-4)}, epochs=8,
    )
    assert (loaded.loss_type, loaded.image_pooling) == (loss, "attention")
    assert isinstance(loaded.image_encoder, CNNEncoder) and isinstance(loaded.text_encoder, TextEncoder)
    assert loaded.temperature == model.temperature != DEFAULT_TEMPERATURE[loss]  # learned, then restored


def test_built_from_encoder_parts(tiny_inputs):
    image_encoder = ViTEncoder(32, 8, 32, num_layers=1, num_heads=2, intermediate_dim=48, name="vision")
    text_encoder = TextEncoder(60, 16, 24, num_layers=2, num_heads=2, intermediate_dim=32, name="text")
    model = DualEncoder(image_encoder, text_encoder, embedding_dim=8, loss="siglip")
    outputs = model(tiny_inputs)
    assert {name: tuple(value.shape) for name, value in outputs.items()} == {
        "image_embedding": (3, 8), "text_embedding": (3, 8)
    }
    assert (model.image_size, model.sequence_length, model.vocabulary_size) == (32, 16, 60)
    assert model.image_encoder is image_encoder and model.text_encoder is text_encoder
    # The parts, two bias-free projections (32 -> 8, 24 -> 8), log-temperature and bias.
    parts = image_encoder.count_params() + text_encoder.count_params()
    assert model.count_params() == parts + 32 * 8 + 24 * 8 + 2


def test_recall_at_k_counts_identical_captions_as_positives():
    # Four pairs; pairs 0 and 2 share a caption. Images retrieve texts by dot product.
    images = np.eye(4, dtype="float32")
    texts = np.eye(4, dtype="float32")[[2, 1, 0, 3]]  # texts of pairs 0 and 2 are swapped
    strict = recall_at_k(images, texts, ks=(1, 4))
    assert strict["image_to_text"] == {"recall@1": 0.5, "recall@4": 1.0}
    assert strict["text_to_image"] == {"recall@1": 0.5, "recall@4": 1.0}
    captions = ["a red circle", "b", "a red circle", "d"]
    shared = recall_at_k(images, texts, ks=(1, 4), captions=captions)
    assert shared["image_to_text"] == {"recall@1": 1.0, "recall@4": 1.0}
    assert shared["text_to_image"] == {"recall@1": 1.0, "recall@4": 1.0}
    # Chance: the two queries of the shared caption have 2 positives among 4, the others 1.
    chance = chance_recall_at_k(captions, ks=(1, 2))
    np.testing.assert_allclose(chance["recall@1"], (2 * 2 / 4 + 2 * 1 / 4) / 4)
    np.testing.assert_allclose(chance["recall@2"], (2 * (1 - 1 / 6) + 2 * (1 - 3 / 6)) / 4)
    np.testing.assert_allclose(chance_recall_at_k(100, ks=(5,))["recall@5"], 0.05)
    with pytest.raises(ValueError, match="same"):
        recall_at_k(images, texts[:3])


def test_pair_dataset_gives_caption_ids(tokenizer, shapes_examples):
    examples = shapes_examples[:64]
    ids = caption_ids(examples)
    captions = [e.caption for e in examples]
    for i in range(len(examples)):
        for j in range(len(examples)):
            assert (ids[i] == ids[j]) == (captions[i] == captions[j])
    features, pair_ids = next(iter(make_pair_dataset(examples, tokenizer, 32, batch_size=64)))
    assert tuple(features["images"].shape) == (64, 32, 32, 3)
    assert tuple(features["token_ids"].shape) == (64, 16)
    np.testing.assert_array_equal(pair_ids.numpy(), ids)
    np.testing.assert_array_equal(features["token_ids"].numpy(), np.asarray(tokenizer(captions)))


# Training run: ~2k procedural pairs, evaluated on 256 held-out pairs.
TRAIN_SIZE, HELD_OUT_SIZE, EPOCHS = 2048, 256, 3
# Recall@5 (both directions) must beat chance by this absolute margin. Chance is ~0.03 on
# 256 held-out pairs (captions repeat, so a query has on average ~1.4 positives).
RECALL_MARGIN = 0.40


# The default suite's retrieval learning check is the product run in tests/training/test_tasks.py.
@pytest.mark.slow
def test_training_lowers_loss_and_lifts_recall():
    train, held_out, vocabulary, tokenizer = caption_split(TRAIN_SIZE, HELD_OUT_SIZE, 16)
    model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=len(vocabulary), encoder="cnn", loss="clip")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    train_data = make_pair_dataset(train, tokenizer, 32, batch_size=64, shuffle=True, seed=0)
    held_out_data = make_pair_dataset(held_out, tokenizer, 32, batch_size=256)
    before = model.evaluate(held_out_data, verbose=0)
    history = model.fit(train_data, epochs=EPOCHS, verbose=0)
    after = model.evaluate(held_out_data, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    assert after < 0.8 * before, (before, after)

    images, texts = embed_pairs(model, held_out_data)
    captions = [e.caption for e in held_out]
    recall = recall_at_k(images, texts, captions=captions)
    chance = chance_recall_at_k(captions)
    assert 0.01 < chance["recall@5"] < 0.05, chance
    assert recall["image_to_text"]["recall@5"] > chance["recall@5"] + RECALL_MARGIN, (recall, chance)
    assert recall["text_to_image"]["recall@5"] > chance["recall@5"] + RECALL_MARGIN, (recall, chance)


def test_errors():
    with pytest.raises(ValueError, match="loss='triplet'"):
        DualEncoder.from_preset("kvlm_tiny", vocabulary_size=10, loss="triplet")
    with pytest.raises(ValueError, match="encoder='rnn'"):
        DualEncoder.from_preset("kvlm_tiny", vocabulary_size=10, encoder="rnn")
    with pytest.raises(ValueError, match="initial_bias"):
        DualEncoder.from_preset("kvlm_tiny", vocabulary_size=10, loss="clip", initial_bias=-1.0)
    model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=10)
    with pytest.raises(ValueError, match="leave `loss` out of compile"):
        model.compile(optimizer="adam", loss="mse")


@pytest.mark.tensorflow_only
def test_exported_embed_signature_matches_keras(tmp_path, tokenizer, shapes_examples):
    import tensorflow as tf

    from kvlm.data import decode_image, resize_image
    from kvlm.export.savedmodel import write_dual_encoder_saved_model

    model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=tokenizer.vocabulary_size(), loss="siglip")
    path = write_dual_encoder_saved_model(model, tokenizer, tmp_path / "1")
    loaded = tf.saved_model.load(str(path))
    assert {"embed", "serving_default"} <= set(loaded.signatures)

    examples = shapes_examples[:5]
    image_bytes = [png_bytes(e) for e in examples]
    texts = [e.caption for e in examples]
    outputs = loaded.signatures["embed"](image_bytes=tf.constant(image_bytes), text=tf.constant(texts))
    assert set(outputs) == {"image_embedding", "text_embedding"}

    images = np.stack([resize_image(decode_image(b), 32).numpy() for b in image_bytes])
    expected = model.predict({"images": images, "token_ids": np.asarray(tokenizer(texts))}, verbose=0)
    for name in ("image_embedding", "text_embedding"):
        assert outputs[name].dtype == tf.float32 and tuple(outputs[name].shape) == (5, 64)
        np.testing.assert_allclose(outputs[name].numpy(), expected[name], atol=1e-5)
    default = loaded.signatures["serving_default"](image_bytes=tf.constant(image_bytes), text=tf.constant(texts))
    np.testing.assert_allclose(default["text_embedding"].numpy(), expected["text_embedding"], atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="same batch size"):
        loaded.signatures["embed"](image_bytes=tf.constant(image_bytes), text=tf.constant(texts[:2]))
