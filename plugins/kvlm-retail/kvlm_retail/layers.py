"""The retail expert layer."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kvlm_retail")
class RetailExpert(keras.layers.Layer):
    """Key-value memory expert: `softmax(x K^T / (sqrt(d_model) * temperature)) V`.

    Each token reads a convex mix of `hidden_dim` learned value slots (think of a
    catalogue of product prototypes), chosen by similarity to learned keys. Works
    token by token on inputs of any rank whose last axis is `d_model`.

    Args:
        d_model: Input and output width.
        hidden_dim: Number of memory slots; defaults to `2 * d_model`.
        temperature: Softmax temperature; lower is sharper.
        dropout: Dropout rate on the slot weights.
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int | None = None,
        temperature: float = 1.0,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"`d_model` must be a positive integer. Received: d_model={d_model}")
        if hidden_dim is not None and (not isinstance(hidden_dim, int) or hidden_dim <= 0):
            raise ValueError(
                f"`hidden_dim` must be a positive integer or None. Received: hidden_dim={hidden_dim}"
            )
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.dropout = dropout
        self.num_slots = hidden_dim or 2 * d_model
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        if input_shape[-1] != self.d_model:
            raise ValueError(f"Expected last dimension d_model={self.d_model}. Received: input_shape={input_shape}")
        self.keys = self.add_weight(
            shape=(self.num_slots, self.d_model), initializer=keras.initializers.RandomNormal(stddev=1.0), name="keys"
        )
        self.values = self.add_weight(
            shape=(self.num_slots, self.d_model), initializer="glorot_uniform", name="values"
        )
        self.output_bias = self.add_weight(shape=(self.d_model,), initializer="zeros", name="output_bias")

    def call(self, x, training=None):
        scale = 1.0 / (math.sqrt(self.d_model) * self.temperature)
        scores = ops.matmul(x, ops.transpose(self.keys)) * scale
        # Softmax in float32 so mixed precision stays stable.
        weights = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), x.dtype)
        weights = self.dropout_layer(weights, training=training)
        return ops.matmul(weights, self.values) + self.output_bias

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            d_model=self.d_model, hidden_dim=self.hidden_dim, temperature=self.temperature, dropout=self.dropout
        )
        return config
