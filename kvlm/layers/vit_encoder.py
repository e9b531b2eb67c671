"""Vision Transformer image encoder."""

from __future__ import annotations

import keras

from kvlm.layers.patch_embedding import PatchEmbedding
from kvlm.layers.transformer import transformer_stack


@keras.saving.register_keras_serializable(package="kvlm")
class ViTEncoder(keras.layers.Layer):
    """Patch embedding followed by pre-norm Transformer encoder layers.

    Args:
        image_size: Side of the square input image in pixels.
        patch_size: Side of one patch in pixels.
        hidden_dim: Token width.
        num_layers: Number of Transformer layers.
        num_heads: Attention heads per layer.
        intermediate_dim: Width of each feed-forward block.
        dropout: Dropout rate inside the Transformer layers.

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
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.patch_embedding = PatchEmbedding(
            image_size, patch_size, hidden_dim, dtype=self.dtype_policy, name="patch_embedding"
        )
        self.transformer_layers = transformer_stack(
            num_layers, num_heads, intermediate_dim, dropout, self.dtype_policy
        )
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, dtype=self.dtype_policy, name="layer_norm"
        )

    def build(self, input_shape):
        self.patch_embedding.build(input_shape)
        token_shape = self.patch_embedding.compute_output_shape(input_shape)
        for layer in self.transformer_layers:
            layer.build(token_shape)
        self.layer_norm.build(token_shape)

    def call(self, images, training=None):
        x = self.patch_embedding(images)
        for layer in self.transformer_layers:
            x = layer(x, training=training)
        return self.layer_norm(x)

    def compute_output_shape(self, input_shape):
        return self.patch_embedding.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            dropout=self.dropout,
        )
        return config
