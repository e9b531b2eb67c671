"""A keras-hub vision backbone as kvlm's image encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops


def preset_image_size(preset: str) -> int:
    """The image side a keras-hub vision preset takes: its image converter's, else its backbone's
    input size (read from the preset's configs; no weights load).

    Raises:
        ValueError: The preset states no image size.
    """
    import keras_hub

    try:
        size = keras_hub.layers.ImageConverter.from_preset(preset).image_size
    except (ValueError, FileNotFoundError, OSError):
        size = None
    if size is None:
        backbone = vision_backbone(keras_hub.models.Backbone.from_preset(preset, load_weights=False))
        inputs = backbone.input
        size = (inputs["images"] if isinstance(inputs, dict) else inputs).shape[1:3]
    if size is None or size[0] is None:
        raise ValueError(f"The keras-hub preset states no image size (no image converter, and its backbone takes "
                         f"any size): give it an image converter. Received: {preset!r}")
    return int(size[0])


def vision_backbone(backbone: keras.Model) -> keras.Model:
    """The vision tower of a keras-hub backbone: its `vision_encoder` (CLIP, SigLIP), else itself."""
    return getattr(backbone, "vision_encoder", None) or backbone


def token_model(backbone: keras.Model) -> keras.Model:
    """`images -> tokens` of a keras-hub vision backbone: its output when that is a token sequence
    `(batch, tokens, width)` (ViT, CLIP, DINOv2) or a feature map `(batch, h, w, channels)` (a
    convolutional backbone such as ResNet); the tokens its last layer pools when it pools them
    (SigLIP's head).

    Raises:
        ValueError: The backbone's output is none of these.
    """
    output = backbone.output
    rank = None if isinstance(output, (dict, list, tuple)) else len(output.shape)
    if rank in (3, 4):
        return backbone
    head = backbone.layers[-1]
    if rank == 2 and not isinstance(head.input, (dict, list, tuple)) and len(head.input.shape) == 3:
        return keras.Model(backbone.input, head.input, name=f"{backbone.name}_tokens")
    shape = {k: v.shape for k, v in output.items()} if isinstance(output, dict) else getattr(output, "shape", output)
    raise ValueError(
        "The image encoder needs a vision backbone that outputs tokens (batch, tokens, width) or a feature map "
        f"(batch, height, width, channels). Received: {type(backbone).__name__} with output {shape}"
    )


@keras.saving.register_keras_serializable(package="kvlm")
class HubImageEncoder(keras.layers.Layer):
    """A keras-hub vision backbone as the image encoder of a kvlm model.

    Images in [0, 1] (kvlm's input pipeline) are scaled as the backbone's keras-hub image converter
    scales pixel values in [0, 255] (`pixels * scale + offset`), run through the backbone, and its
    tokens (a feature map's positions, row by row) projected to `hidden_dim` when the widths differ.

    Args:
        backbone: A keras-hub vision `Backbone` (or one with a `vision_encoder`, e.g. CLIP or SigLIP),
            or its serialized config.
        hidden_dim: Width of the tokens out.
        scale, offset: The image converter's scale and offset (a float or one per channel);
            default: pixels in [0, 1].
        image_size: Side of the square input images; default: the backbone's input size
            (required when the backbone takes any size, as ResNet does).

    Input: `(batch, size, size, 3)` float images in [0, 1]. Output: `(batch, tokens, hidden_dim)`.

    Example:
        >>> encoder = HubImageEncoder.from_preset("siglip_base_patch16_224", hidden_dim=256)
    """

    def __init__(self, backbone, hidden_dim: int, scale: float | Sequence[float] = 1.0 / 255.0,
                 offset: float | Sequence[float] = 0.0, image_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        if not isinstance(backbone, keras.Model):
            raise ValueError(f"`backbone` must be a keras-hub vision backbone. Received: backbone={backbone!r}")
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"`hidden_dim` must be an int >= 1. Received: hidden_dim={hidden_dim!r}")
        self.backbone = vision_backbone(backbone)
        self.tokens = token_model(self.backbone)
        self.hidden_dim = hidden_dim
        self.scale, self.offset = _per_channel(scale, "scale"), _per_channel(offset, "offset")
        inputs = self.backbone.input
        own_size = (inputs["images"] if isinstance(inputs, dict) else inputs).shape[1]
        image_size = image_size or own_size
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1 or own_size not in (None, image_size):
            raise ValueError(f"`image_size` must be an int >= 1 that the backbone takes ({own_size or 'any size'}). "
                             f"Received: image_size={image_size!r}")
        self.image_size = image_size
        for layer in self.backbone._flatten_layers():
            # keras-hub's DINOv2 re-derives these from its stored position embeddings on load, so
            # training them would not survive a `.keras` round trip.
            if getattr(layer, "interpolated_position_embeddings", None) is not None:
                layer.interpolated_position_embeddings.trainable = False
        images = keras.KerasTensor((None, image_size, image_size, 3))
        shape = self.tokens.compute_output_spec({"images": images} if isinstance(inputs, dict) else images).shape
        self.num_tokens = shape[1] * shape[2] if len(shape) == 4 else shape[1]
        width = shape[-1]
        self.projection = None
        if width != hidden_dim:
            self.projection = keras.layers.Dense(hidden_dim, dtype=self.dtype_policy, name="projection")

    @classmethod
    def from_preset(cls, preset: str, hidden_dim: int, **kwargs) -> "HubImageEncoder":
        """The backbone of a keras-hub preset (a Kaggle or Hugging Face handle, or a local folder)
        with its pretrained weights, scaled as the preset's image converter scales (pixels in
        [0, 1] when the preset has none)."""
        import keras_hub

        backbone = keras_hub.models.Backbone.from_preset(preset)
        try:
            converter = keras_hub.layers.ImageConverter.from_preset(preset)
        except (ValueError, FileNotFoundError, OSError):
            converter = None
        scaling = {}
        if converter is not None:
            scaling = {key: value for key in ("scale", "offset")
                       if (value := getattr(converter, key, None)) is not None}
            if converter.image_size is not None and "image_size" not in kwargs:
                scaling["image_size"] = int(converter.image_size[0])
        return cls(backbone, hidden_dim, **scaling, **kwargs)

    def build(self, input_shape):
        if self.projection is not None:
            self.projection.build((None, self.num_tokens, self.tokens.output.shape[-1]))

    def call(self, images):
        pixels = ops.cast(images, self.compute_dtype) * 255.0
        scaled = pixels * ops.cast(self.scale, self.compute_dtype) + ops.cast(self.offset, self.compute_dtype)
        inputs = {"images": scaled} if isinstance(self.tokens.input, dict) else scaled
        x = self.tokens(inputs)
        if len(x.shape) == 4:
            x = ops.reshape(x, (ops.shape(x)[0], self.num_tokens, x.shape[3]))
        return x if self.projection is None else self.projection(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tokens, self.hidden_dim)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone), hidden_dim=self.hidden_dim,
                      scale=self.scale, offset=self.offset, image_size=self.image_size)
        return config


def _per_channel(value, name: str) -> list[float]:
    """`value` (a float or one per channel) as three floats."""
    try:
        values = np.broadcast_to(np.asarray(value, dtype="float64"), (3,))
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`{name}` must be a finite float or one per channel. Received: {name}={value!r}")
    return [float(v) for v in values]
