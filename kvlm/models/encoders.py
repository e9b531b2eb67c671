"""The encoder parts of the task models, built from a preset's sizes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from kvlm.layers import CNNEncoder, TextEncoder, ViTEncoder
from kvlm.models.presets import get_preset

ENCODERS = ("vit", "cnn")
# Preset keys that size the encoders (`encoder` picks the image encoder; presets leave it to "vit").
ENCODER_KEYS = (
    "encoder", "image_size", "patch_size", "cnn_filters", "cnn_stages", "sequence_length",
    "hidden_dim", "num_heads", "intermediate_dim", "num_image_layers", "num_text_layers", "dropout",
)


def preset_sizes(preset: str, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(sizes, options)`: the preset's `ENCODER_KEYS` with `overrides` applied, and the other overrides."""
    config = {"encoder": "vit", **get_preset(preset)}
    config.update({key: value for key, value in overrides.items() if key in ENCODER_KEYS})
    sizes = {key: config[key] for key in ENCODER_KEYS}
    return sizes, {key: value for key, value in overrides.items() if key not in ENCODER_KEYS}


def image_encoder(sizes: Mapping[str, Any], dtype=None, name: str = "image_encoder") -> keras.layers.Layer:
    """A `ViTEncoder` or `CNNEncoder` (`sizes["encoder"]`): images -> `(batch, tokens, hidden_dim)`."""
    encoder = sizes["encoder"]
    if encoder not in ENCODERS:
        raise ValueError(f"`encoder` must be one of {ENCODERS}. Received: encoder={encoder!r}")
    if encoder == "vit":
        return ViTEncoder(
            sizes["image_size"], sizes["patch_size"], sizes["hidden_dim"], sizes["num_image_layers"],
            sizes["num_heads"], sizes["intermediate_dim"], sizes["dropout"], dtype=dtype, name=name,
        )
    return CNNEncoder(
        sizes["image_size"], sizes["hidden_dim"], sizes["cnn_filters"], sizes["cnn_stages"], dtype=dtype, name=name
    )


def text_encoder(
    vocabulary_size: int, sizes: Mapping[str, Any], dtype=None, name: str = "text_encoder"
) -> TextEncoder:
    """A `TextEncoder`: token ids (0 = padding) -> `(batch, sequence_length, hidden_dim)`."""
    return TextEncoder(
        vocabulary_size, sizes["sequence_length"], sizes["hidden_dim"], sizes["num_text_layers"],
        sizes["num_heads"], sizes["intermediate_dim"], sizes["dropout"], dtype=dtype, name=name,
    )



def hub_image_encoder(image_encoder, hidden_dim: int, dtype=None, name: str = "image_encoder"):
    """A `kvlm.hub.HubImageEncoder` from a keras-hub preset handle, a keras-hub `Backbone` or a
    serialized `HubImageEncoder`, projecting to `hidden_dim`.

    Raises:
        ValueError: `image_encoder` is none of these, or a serialized encoder of another width.
    """
    from kvlm.hub import HubImageEncoder

    if isinstance(image_encoder, str):
        return HubImageEncoder.from_preset(image_encoder, hidden_dim, dtype=dtype, name=name)
    if isinstance(image_encoder, keras.Model):
        return HubImageEncoder(image_encoder, hidden_dim, dtype=dtype, name=name)
    if isinstance(image_encoder, dict):
        encoder = keras.saving.deserialize_keras_object(image_encoder)
        if isinstance(encoder, HubImageEncoder) and encoder.hidden_dim == hidden_dim:
            return encoder
    raise ValueError(
        "`image_encoder` must be a keras-hub preset handle, a keras-hub Backbone or a serialized HubImageEncoder "
        f"of width hidden_dim={hidden_dim}. Received: "
        + (f"a HubImageEncoder of width {encoder.hidden_dim}" if isinstance(image_encoder, dict) and
           isinstance(encoder, HubImageEncoder) else f"image_encoder={image_encoder!r}")
    )
