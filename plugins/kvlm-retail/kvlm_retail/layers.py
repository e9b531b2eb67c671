"""The retail expert layer."""

from __future__ import annotations

import math

import keras
from keras import ops

from kvlm.experts.layer import ExpertLayer


@keras.saving.register_keras_serializable(package="kvlm_retail")
class RetailExpert(ExpertLayer):
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

    def __init__(self, d_model: int, hidden_dim: int | None = None, temperature: float = 1.0, dropout: float = 0.0,
                 **kwargs):
        super().__init__(d_model, hidden_dim, dropout, **kwargs)
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature}")
        self.temperature = temperature
        self.num_slots = hidden_dim or 2 * d_model

    def build(self, input_shape):
        super().build(input_shape)
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

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
