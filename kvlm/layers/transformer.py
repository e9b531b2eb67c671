"""The pre-norm keras-hub Transformer stack shared by the image and text encoders."""

from __future__ import annotations

from keras_hub.layers import TransformerEncoder


def transformer_stack(
    num_layers: int, num_heads: int, intermediate_dim: int, dropout: float, dtype
) -> list[TransformerEncoder]:
    """`num_layers` pre-norm GELU `TransformerEncoder`s named `transformer_layer_{i}`."""
    if num_layers < 0:
        raise ValueError(f"`num_layers` must be >= 0. Received: num_layers={num_layers}")
    return [
        TransformerEncoder(
            intermediate_dim=intermediate_dim,
            num_heads=num_heads,
            dropout=dropout,
            activation="gelu",
            normalize_first=True,
            dtype=dtype,
            name=f"transformer_layer_{i}",
        )
        for i in range(num_layers)
    ]
