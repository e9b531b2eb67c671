"""Vision Transformer image encoder."""

from __future__ import annotations

import keras

from kvlm.layers.patch_embedding import PatchEmbedding
from kvlm.layers.transformer import TransformerStack


@keras.saving.register_keras_serializable(package="kvlm")
class ViTEncoder(TransformerStack):
    """Patch embedding followed by pre-norm Transformer encoder layers.

    Args:
        image_size: Side of the square input image in pixels.
        patch_size: Side of one patch in pixels.
        hidden_dim, num_layers, num_heads, intermediate_dim, dropout: As for `TransformerStack`.

    Input shape: `(batch, image_size, image_size, 3)`, float pixels in [0, 1].
    Output shape: `(batch, num_patches, hidden_dim)`.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(hidden_dim, num_layers, num_heads, intermediate_dim, dropout, **kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.patch_embedding = PatchEmbedding(
            image_size, patch_size, hidden_dim, dtype=self.dtype_policy, name="patch_embedding"
        )

    def build(self, input_shape):
        self.patch_embedding.build(input_shape)
        self.build_stack(self.patch_embedding.compute_output_shape(input_shape))

    def call(self, images, training=None):
        return self.stack(self.patch_embedding(images), training=training)

    def compute_output_shape(self, input_shape):
        return self.patch_embedding.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(image_size=self.image_size, patch_size=self.patch_size)
        return config
