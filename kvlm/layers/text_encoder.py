"""Transformer text encoder from keras-hub building blocks."""

from __future__ import annotations

import keras
from keras import ops
from keras_hub.layers import TokenAndPositionEmbedding

from kvlm.layers.transformer import TransformerStack


@keras.saving.register_keras_serializable(package="kvlm")
class TextEncoder(TransformerStack):
    """Token + position embeddings and Transformer layers over padded token ids.

    Token id 0 is padding: it is masked out of every attention.

    Args:
        vocabulary_size: Number of token ids.
        sequence_length: Maximum number of tokens.
        hidden_dim, num_layers, num_heads, intermediate_dim, dropout: As for `TransformerStack`.

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
        super().__init__(hidden_dim, num_layers, num_heads, intermediate_dim, dropout, **kwargs)
        if vocabulary_size < 2:
            raise ValueError(f"`vocabulary_size` must be >= 2. Received: vocabulary_size={vocabulary_size}")
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.embedding = TokenAndPositionEmbedding(
            vocabulary_size, sequence_length, hidden_dim, dtype=self.dtype_policy, name="embedding"
        )
        self.supports_masking = True

    def build(self, input_shape):
        self.embedding.build(input_shape)
        self.build_stack((input_shape[0], input_shape[1], self.hidden_dim))

    def call(self, token_ids, training=None):
        return self.stack(self.embedding(token_ids), padding_mask=ops.not_equal(token_ids, 0), training=training)

    def compute_mask(self, token_ids, mask=None):
        return ops.not_equal(token_ids, 0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(vocabulary_size=self.vocabulary_size, sequence_length=self.sequence_length)
        return config
