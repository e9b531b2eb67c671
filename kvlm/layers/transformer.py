"""The pre-norm keras-hub Transformer stack shared by the image and text encoders."""

from __future__ import annotations

import keras
from keras_hub.layers import TransformerEncoder


class TransformerStack(keras.layers.Layer):
    """Base of an encoder whose tokens pass `num_layers` pre-norm GELU keras-hub
    `TransformerEncoder`s and a final layer norm.

    Args:
        hidden_dim: Token width.
        num_layers: Number of Transformer layers (0 for embeddings and the norm only).
        num_heads: Attention heads per layer.
        intermediate_dim: Width of each feed-forward block.
        dropout: Dropout rate inside the Transformer layers.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_layers < 0:
            raise ValueError(f"`num_layers` must be >= 0. Received: num_layers={num_layers}")
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.transformer_layers = [
            TransformerEncoder(
                intermediate_dim=intermediate_dim, num_heads=num_heads, dropout=dropout, activation="gelu",
                normalize_first=True, dtype=self.dtype_policy, name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.layer_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=self.dtype_policy, name="layer_norm")

    def build_stack(self, token_shape) -> None:
        """Builds the Transformer layers and the norm for `(batch, tokens, hidden_dim)` tokens."""
        for layer in self.transformer_layers:
            layer.build(token_shape)
        self.layer_norm.build(token_shape)

    def stack(self, x, padding_mask=None, training=None):
        """The tokens `x` through the Transformer layers (attending where `padding_mask`) and the norm."""
        for layer in self.transformer_layers:
            x = layer(x, padding_mask=padding_mask, training=training)
        return self.layer_norm(x)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            dropout=self.dropout,
        )
        return config
