"""The image and text encoders every task model builds from the same preset keys."""

from __future__ import annotations

import keras

from kvlm.layers import CNNEncoder, TextEncoder, ViTEncoder

ENCODERS = ("vit", "cnn")


def image_encoder(
    encoder: str,
    image_size: int,
    hidden_dim: int,
    *,
    patch_size: int,
    cnn_filters: int,
    cnn_stages: int,
    num_layers: int,
    num_heads: int,
    intermediate_dim: int,
    dropout: float,
    dtype=None,
) -> keras.layers.Layer:
    """A `ViTEncoder` or `CNNEncoder` named `image_encoder`: images -> `(batch, tokens, hidden_dim)`."""
    if encoder not in ENCODERS:
        raise ValueError(f"`encoder` must be one of {ENCODERS}. Received: encoder={encoder!r}")
    if encoder == "vit":
        return ViTEncoder(
            image_size, patch_size, hidden_dim, num_layers, num_heads, intermediate_dim,
            dropout, dtype=dtype, name="image_encoder",
        )
    return CNNEncoder(image_size, hidden_dim, cnn_filters, cnn_stages, dtype=dtype, name="image_encoder")


def text_encoder(
    vocabulary_size: int,
    sequence_length: int,
    hidden_dim: int,
    *,
    num_layers: int,
    num_heads: int,
    intermediate_dim: int,
    dropout: float,
    dtype=None,
) -> TextEncoder:
    """A `TextEncoder` named `text_encoder`: token ids (0 = padding) -> `(batch, length, hidden_dim)`."""
    if vocabulary_size < 2:
        raise ValueError(f"`vocabulary_size` must be >= 2. Received: vocabulary_size={vocabulary_size}")
    return TextEncoder(
        vocabulary_size, sequence_length, hidden_dim, num_layers, num_heads,
        intermediate_dim, dropout, dtype=dtype, name="text_encoder",
    )


# Constructor arguments every task model takes for its encoders, stored as attributes of the same name.
ENCODER_CONFIG_KEYS = (
    "vocabulary_size", "image_size", "encoder", "patch_size", "cnn_filters", "cnn_stages",
    "sequence_length", "hidden_dim", "num_heads", "intermediate_dim", "num_image_layers", "dropout",
)


def encoder_config(model: keras.Model) -> dict:
    """The base of a task model's `get_config`: name, trainable, dtype and its encoder arguments."""
    return {
        "name": model.name,
        "trainable": model.trainable,
        "dtype": keras.dtype_policies.serialize(model.dtype_policy),
        **{key: getattr(model, key) for key in ENCODER_CONFIG_KEYS},
    }
