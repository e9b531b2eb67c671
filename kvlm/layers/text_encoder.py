"""Transformer text encoder from keras-hub building blocks."""

from __future__ import annotations

import keras
from keras import ops
from keras_hub.layers import TokenAndPositionEmbedding

from kvlm.layers.transformer import transformer_stack


@keras.saving.register_keras_serializable(package="kvlm")
class TextEncoder(keras.layers.Layer):
    """Token + position embeddings and Transformer layers over padded token ids.

    Token id 0 is padding: it is masked out of every attention.

    Args:
        vocabulary_size: Number of token ids.
        sequence_length: Maximum number of tokens.
        hidden_dim: Token width.
        num_layers: Number of Transformer layers.
        num_heads: Attention heads per layer.
        intermediate_dim: Width of each feed-forward block.
        dropout: Dropout rate inside the Transformer layers.

    Input shape: `(batch, sequence_length)` int token ids.
    Output shape: `(batch, sequence_length, hidden_dim)`.
    """

    def __init__(
        self,
        vocabulary_size: int,
        sequence_length: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.embedding = TokenAndPositionEmbedding(
            vocabulary_size, sequence_length, hidden_dim, dtype=self.dtype_policy, name="embedding"
        )
        self.transformer_layers = transformer_stack(
            num_layers, num_heads, intermediate_dim, dropout, self.dtype_policy
        )
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, dtype=self.dtype_policy, name="layer_norm"
        )
        self.supports_masking = True

    def build(self, input_shape):
        self.embedding.build(input_shape)
        token_shape = (input_shape[0], input_shape[1], self.hidden_dim)
        for layer in self.transformer_layers:
            layer.build(token_shape)
        self.layer_norm.build(token_shape)

    def call(self, token_ids, training=None):
        padding_mask = ops.not_equal(token_ids, 0)
        x = self.embedding(token_ids)
        for layer in self.transformer_layers:
            x = layer(x, padding_mask=padding_mask, training=training)
        return self.layer_norm(x)

    def compute_mask(self, token_ids, mask=None):
        return ops.not_equal(token_ids, 0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocabulary_size=self.vocabulary_size,
            sequence_length=self.sequence_length,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            dropout=self.dropout,
        )
        return config
