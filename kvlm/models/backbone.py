"""The VLM backbone: image encoder + text encoder + fusion blocks."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kvlm.layers import FusionBlock, ModalityFusion
from kvlm.models import encoders
from kvlm.models.presets import get_preset


@keras.saving.register_keras_serializable(package="kvlm")
class VLMBackbone(keras.Model):
    """Functional backbone mapping `{"images", "token_ids"}` to fused token features.

    Args:
        vocabulary_size: Number of text token ids (0 is padding).
        image_size: Side of the square input images.
        encoder: `"vit"` or `"cnn"`.
        patch_size: ViT patch side.
        cnn_filters, cnn_stages: CNN encoder width and number of downsampling stages.
        sequence_length: Number of text tokens.
        hidden_dim, num_heads, intermediate_dim: Transformer sizes shared by all parts.
        num_image_layers, num_text_layers, num_fusion_layers: Depths.
        dropout: Dropout rate.
        moe: Optional `kvlm.layers.SparseMoE` arguments; when given, every other fusion
            block (the 2nd, 4th, ...) uses a SparseMoE feed-forward (V-MoE placement).
        image_encoder: Optional keras-hub vision encoder in place of kvlm's own: a preset handle
            (Kaggle, Hugging Face or a local folder, with its pretrained weights), a keras-hub
            `Backbone`, or a serialized `kvlm.hub.HubImageEncoder`. It sets `image_size`.

    Outputs a dict: `sequence_output` `(batch, 1 + N + L, hidden_dim)`, `pooled_output`
    (the [CLS] token), `padding_mask` and `modality` ids of the fused sequence.
    """

    def __init__(
        self,
        vocabulary_size: int,
        image_size: int = 32,
        encoder: str = "vit",
        patch_size: int = 4,
        cnn_filters: int = 32,
        cnn_stages: int = 2,
        sequence_length: int = 16,
        hidden_dim: int = 64,
        num_heads: int = 4,
        intermediate_dim: int = 128,
        num_image_layers: int = 1,
        num_text_layers: int = 1,
        num_fusion_layers: int = 2,
        dropout: float = 0.0,
        moe: dict[str, Any] | None = None,
        image_encoder: str | keras.Model | dict | None = None,
        dtype=None,
        **kwargs,
    ):
        hub_encoder = None
        if image_encoder is not None:
            hub_encoder = encoders.hub_image_encoder(image_encoder, hidden_dim, dtype)
            image_size = hub_encoder.image_size
        sizes = dict(
            encoder=encoder, image_size=image_size, patch_size=patch_size, cnn_filters=cnn_filters,
            cnn_stages=cnn_stages, sequence_length=sequence_length, hidden_dim=hidden_dim, num_heads=num_heads,
            intermediate_dim=intermediate_dim, num_image_layers=num_image_layers, num_text_layers=num_text_layers,
            dropout=dropout,
        )
        images = keras.Input((image_size, image_size, 3), dtype="float32", name="images")
        token_ids = keras.Input((sequence_length,), dtype="int32", name="token_ids")
        image_encoder = hub_encoder or encoders.image_encoder(sizes, dtype)
        text_encoder = encoders.text_encoder(vocabulary_size, sizes, dtype)
        image_tokens = image_encoder(images)
        text_tokens = text_encoder(token_ids)
        text_mask = ops.not_equal(token_ids, 0)
        x, padding_mask, modality = ModalityFusion(hidden_dim, dtype=dtype, name="modality_fusion")(
            image_tokens, text_tokens, text_mask
        )
        for i in range(num_fusion_layers):
            ffn = None
            if moe is not None and i % 2 == 1:
                from kvlm.layers.moe import SparseMoE

                ffn = SparseMoE(**moe, dtype=dtype, name=f"moe_{i}")
            x = FusionBlock(
                hidden_dim, num_heads, intermediate_dim, dropout, ffn=ffn, dtype=dtype,
                name=f"fusion_block_{i}",
            )(x, padding_mask=padding_mask, modality=modality)
        x = keras.layers.LayerNormalization(epsilon=1e-6, dtype=dtype, name="final_norm")(x)
        pooled = x[:, 0, :]
        super().__init__(
            inputs={"images": images, "token_ids": token_ids},
            outputs={
                "sequence_output": x,
                "pooled_output": pooled,
                "padding_mask": padding_mask,
                "modality": modality,
            },
            dtype=dtype,
            **kwargs,
        )
        self.vocabulary_size = vocabulary_size
        self.sizes = sizes
        for key, value in sizes.items():
            setattr(self, key, value)
        self.num_fusion_layers = num_fusion_layers
        self.moe = moe
        self.hub_image_encoder = hub_encoder

    @classmethod
    def from_preset(cls, preset: str, vocabulary_size: int, **overrides) -> "VLMBackbone":
        """Builds a backbone from a preset name, with keyword overrides."""
        config = get_preset(preset)
        config.update(overrides)
        return cls(vocabulary_size=vocabulary_size, **config)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "vocabulary_size": self.vocabulary_size,
            **self.sizes,
            "num_fusion_layers": self.num_fusion_layers,
            "moe": self.moe,
            "image_encoder": None if self.hub_image_encoder is None
            else keras.saving.serialize_keras_object(self.hub_image_encoder),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
