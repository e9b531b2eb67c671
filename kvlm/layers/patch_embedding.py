"""Patch embedding for Vision Transformers."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kvlm")
class PatchEmbedding(keras.layers.Layer):
    """Splits an image into square patches and embeds each with a learned position.

    Args:
        image_size: Side of the (square) input image in pixels.
        patch_size: Side of one patch in pixels; must divide `image_size`.
        hidden_dim: Size of each patch embedding.

    Input shape: `(batch, image_size, image_size, channels)`.
    Output shape: `(batch, (image_size // patch_size) ** 2, hidden_dim)`.
    """

    def __init__(self, image_size: int, patch_size: int, hidden_dim: int, **kwargs):
        super().__init__(**kwargs)
        if image_size % patch_size:
            raise ValueError(
                "`patch_size` must divide `image_size`. "
                f"Received: image_size={image_size}, patch_size={patch_size}"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_patches = (image_size // patch_size) ** 2
        self.projection = keras.layers.Conv2D(
            hidden_dim, patch_size, strides=patch_size, dtype=self.dtype_policy, name="projection"
        )

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.position_embedding = self.add_weight(
            shape=(self.num_patches, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="position_embedding",
        )

    def call(self, images):
        x = self.projection(images)
        x = ops.reshape(x, (-1, self.num_patches, self.hidden_dim))
        return x + ops.cast(self.position_embedding, x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_patches, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size, patch_size=self.patch_size, hidden_dim=self.hidden_dim
        )
        return config
