"""The medical expert layer."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kvlm_medical")
class MedicalExpert(keras.layers.Layer):
    """Gated linear unit feed-forward expert: `(act(x W_gate) * x W_up) W_down`.

    The multiplicative gate lets the expert switch features on only where a pattern
    (say, a lesion's texture) is present. Works token by token on inputs of any rank
    whose last axis is `d_model`.

    Args:
        d_model: Input and output width.
        hidden_dim: Width of the gate and up projections; defaults to `8 * d_model // 3`.
        activation: Activation of the gate (`"silu"` gives SwiGLU, `"gelu"` GeGLU).
        dropout: Dropout rate on the gated activations.
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int | None = None,
        activation: str = "silu",
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
        if not isinstance(activation, str):
            raise ValueError(
                f"`activation` must be the name of a Keras activation. Received: activation={activation!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.dropout = dropout
        inner = hidden_dim or max(1, 8 * d_model // 3)
        policy = self.dtype_policy
        self.gate = keras.layers.Dense(inner, activation=activation, dtype=policy, name="gate")
        self.up = keras.layers.Dense(inner, use_bias=False, dtype=policy, name="up")
        self.down = keras.layers.Dense(d_model, use_bias=False, dtype=policy, name="down")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=policy)

    def build(self, input_shape):
        if input_shape[-1] != self.d_model:
            raise ValueError(f"Expected last dimension d_model={self.d_model}. Received: input_shape={input_shape}")
        self.gate.build(input_shape)
        self.up.build(input_shape)
        self.down.build(tuple(input_shape[:-1]) + (self.gate.units,))

    def call(self, x, training=None):
        hidden = ops.multiply(self.gate(x), self.up(x))
        return self.down(self.dropout_layer(hidden, training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            d_model=self.d_model, hidden_dim=self.hidden_dim, activation=self.activation, dropout=self.dropout
        )
        return config
