"""`ExpertLayer`: the base of token-wise expert layers (validation, width check, config)."""

from __future__ import annotations

import keras


class ExpertLayer(keras.layers.Layer):
    """Base of a token-wise expert mapping `(..., d_model)` to `(..., d_model)`.

    It validates the common arguments, owns a `Dropout` (`self.dropout_layer`),
    checks the input width in `build`, keeps the shape in `compute_output_shape` and
    puts the common arguments in `get_config`. A subclass validates and stores its own
    arguments, calls `super().build(input_shape)` in `build` and adds its own keys in
    `get_config`. Decorate the subclass with
    `@keras.saving.register_keras_serializable(package=...)`.

    Args:
        d_model: Input and output width.
        hidden_dim: Inner width; `None` lets the subclass pick a default.
        dropout: Dropout rate, applied where the subclass uses `self.dropout_layer`.
    """

    def __init__(self, d_model: int, hidden_dim: int | None = None, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"`d_model` must be a positive integer. Received: d_model={d_model}")
        if hidden_dim is not None and (isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim <= 0):
            raise ValueError(f"`hidden_dim` must be a positive integer or None. Received: hidden_dim={hidden_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    @staticmethod
    def check_activation(activation) -> str:
        """Returns `activation` if it names a Keras activation; else ValueError."""
        if not isinstance(activation, str):
            raise ValueError(
                f"`activation` must be the name of a Keras activation. Received: activation={activation!r}"
            )
        keras.activations.get(activation)
        return activation

    def build(self, input_shape):
        if input_shape[-1] != self.d_model:
            raise ValueError(
                f"Expected inputs with last dimension d_model={self.d_model}. Received: input_shape={input_shape}"
            )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(d_model=self.d_model, hidden_dim=self.hidden_dim, dropout=self.dropout)
        return config
