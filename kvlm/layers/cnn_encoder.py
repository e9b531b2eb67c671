"""Small residual CNN image encoder that emits a grid of tokens."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kvlm")
class ResidualConvBlock(keras.layers.Layer):
    """Two 3x3 convolutions with a skip connection: `x + conv(relu(conv(x)))`, then ReLU.

    Args:
        filters: Channels of the block; equal to the input channels.
    """

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv_1 = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu", dtype=self.dtype_policy, name="conv_1"
        )
        self.conv_2 = keras.layers.Conv2D(
            filters, 3, padding="same", dtype=self.dtype_policy, name="conv_2"
        )

    def build(self, input_shape):
        if input_shape[-1] != self.filters:
            raise ValueError(
                "ResidualConvBlock input channels must equal `filters`. "
                f"Received: input_shape={input_shape}, filters={self.filters}"
            )
        self.conv_1.build(input_shape)
        self.conv_2.build(input_shape)

    def call(self, x):
        return ops.relu(x + self.conv_2(self.conv_1(x)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters)
        return config


@keras.saving.register_keras_serializable(package="kvlm")
class CNNEncoder(keras.layers.Layer):
    """Residual CNN: a stride-2 stem, then `num_stages` of (residual block, stride-2 conv).

    The final feature map is flattened into `(image_size / 2**(num_stages + 1))**2` tokens,
    projected to `hidden_dim` and given learned position embeddings.

    Args:
        image_size: Side of the square input image in pixels.
        hidden_dim: Token width.
        filters: Channels of the convolutional stages.
        num_stages: Number of downsampling stages.

    Input shape: `(batch, image_size, image_size, 3)`, float pixels in [0, 1].
    Output shape: `(batch, num_tokens, hidden_dim)`.
    """

    def __init__(self, image_size: int, hidden_dim: int, filters: int = 32, num_stages: int = 2, **kwargs):
        super().__init__(**kwargs)
        if num_stages < 1 or image_size % (2 ** (num_stages + 1)):
            raise ValueError(
                "`image_size` must be divisible by 2**(num_stages + 1) and num_stages >= 1. "
                f"Received: image_size={image_size}, num_stages={num_stages}"
            )
        self.image_size = image_size
        self.hidden_dim = hidden_dim
        self.filters = filters
        self.num_stages = num_stages
        self.grid_size = image_size // (2 ** (num_stages + 1))
        self.num_tokens = self.grid_size**2
        policy = self.dtype_policy
        self.stem = keras.layers.Conv2D(
            filters, 3, strides=2, padding="same", activation="relu", dtype=policy, name="stem"
        )
        self.blocks = [ResidualConvBlock(filters, dtype=policy, name=f"block_{i}") for i in range(num_stages)]
        self.downsamples = [
            keras.layers.Conv2D(
                filters, 3, strides=2, padding="same", activation="relu", dtype=policy,
                name=f"downsample_{i}",
            )
            for i in range(num_stages)
        ]
        self.projection = keras.layers.Dense(hidden_dim, dtype=policy, name="projection")
        self.layer_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="layer_norm")

    def build(self, input_shape):
        batch, size = input_shape[0], input_shape[1]
        self.stem.build(input_shape)
        size = None if size is None else size // 2
        shape = (batch, size, size, self.filters)
        for block, down in zip(self.blocks, self.downsamples):
            block.build(shape)
            down.build(shape)
            size = None if size is None else size // 2
            shape = (batch, size, size, self.filters)
        self.projection.build((batch, self.num_tokens, self.filters))
        self.layer_norm.build((batch, self.num_tokens, self.hidden_dim))
        self.position_embedding = self.add_weight(
            shape=(self.num_tokens, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="position_embedding",
        )

    def call(self, images):
        x = self.stem(images)
        for block, down in zip(self.blocks, self.downsamples):
            x = down(block(x))
        x = ops.reshape(x, (-1, self.num_tokens, self.filters))
        x = self.projection(x) + ops.cast(self.position_embedding, x.dtype)
        return self.layer_norm(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tokens, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size,
            hidden_dim=self.hidden_dim,
            filters=self.filters,
            num_stages=self.num_stages,
        )
        return config
