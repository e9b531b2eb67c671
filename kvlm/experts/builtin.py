"""kvlm's own expert: a generic feed-forward network, registered as expert "ffn"."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="kvlm")
class FFNExpert(keras.layers.Layer):
    """Token-wise feed-forward expert: `Dense(hidden_dim, activation) -> Dense(d_model)`.

    Args:
        d_model: Input and output width.
        hidden_dim: Inner width; defaults to `4 * d_model`.
        activation: Activation of the inner layer.
        dropout: Dropout rate on the inner activations.
        use_bias: Whether the dense layers use biases.
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int | None = None,
        activation: str = "gelu",
        dropout: float = 0.0,
        use_bias: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"`d_model` must be a positive integer. Received: d_model={d_model}")
        if hidden_dim is not None and (not isinstance(hidden_dim, int) or hidden_dim <= 0):
            raise ValueError(
                f"`hidden_dim` must be a positive integer or None. Received: hidden_dim={hidden_dim}"
            )
        if not isinstance(activation, str):
            raise ValueError(
                f"`activation` must be the name of a Keras activation. Received: activation={activation!r}"
            )
        keras.activations.get(activation)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.dropout = dropout
        self.use_bias = use_bias
        policy = self.dtype_policy
        inner = hidden_dim or 4 * d_model
        self.inner = keras.layers.Dense(inner, activation=activation, use_bias=use_bias, dtype=policy, name="inner")
        self.outer = keras.layers.Dense(d_model, use_bias=use_bias, dtype=policy, name="outer")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=policy)

    def build(self, input_shape):
        if input_shape[-1] != self.d_model:
            raise ValueError(
                f"Expected inputs with last dimension d_model={self.d_model}. Received: input_shape={input_shape}"
            )
        self.inner.build(input_shape)
        self.outer.build(tuple(input_shape[:-1]) + (self.inner.units,))

    def call(self, x, training=None):
        return self.outer(self.dropout_layer(self.inner(x), training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            d_model=self.d_model,
            hidden_dim=self.hidden_dim,
            activation=self.activation,
            dropout=self.dropout,
            use_bias=self.use_bias,
        )
        return config


def build(d_model: int, **options) -> FFNExpert:
    """The `ExpertSpec.build` of the built-in "ffn" expert."""
    return FFNExpert(d_model=d_model, **options)
