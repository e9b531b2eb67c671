"""kvlm's own expert: a generic feed-forward network, registered as expert "ffn"."""

from __future__ import annotations

import keras

from kvlm.experts.layer import ExpertLayer


@keras.saving.register_keras_serializable(package="kvlm")
class FFNExpert(ExpertLayer):
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
        super().__init__(d_model, hidden_dim, dropout, **kwargs)
        self.activation = self.check_activation(activation)
        self.use_bias = use_bias
        policy = self.dtype_policy
        inner = hidden_dim or 4 * d_model
        self.inner = keras.layers.Dense(inner, activation=activation, use_bias=use_bias, dtype=policy, name="inner")
        self.outer = keras.layers.Dense(d_model, use_bias=use_bias, dtype=policy, name="outer")

    def build(self, input_shape):
        super().build(input_shape)
        self.inner.build(input_shape)
        self.outer.build(tuple(input_shape[:-1]) + (self.inner.units,))

    def call(self, x, training=None):
        return self.outer(self.dropout_layer(self.inner(x), training=training))

    def get_config(self):
        config = super().get_config()
        config.update(activation=self.activation, use_bias=self.use_bias)
        return config
