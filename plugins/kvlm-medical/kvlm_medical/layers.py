"""The medical expert layer."""

from __future__ import annotations

import keras
from keras import ops

from kvlm.experts.layer import ExpertLayer


@keras.saving.register_keras_serializable(package="kvlm_medical")
class MedicalExpert(ExpertLayer):
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

    def __init__(self, d_model: int, hidden_dim: int | None = None, activation: str = "silu", dropout: float = 0.0,
                 **kwargs):
        super().__init__(d_model, hidden_dim, dropout, **kwargs)
        self.activation = self.check_activation(activation)
        inner = hidden_dim or max(1, 8 * d_model // 3)
        policy = self.dtype_policy
        self.gate = keras.layers.Dense(inner, activation=activation, dtype=policy, name="gate")
        self.up = keras.layers.Dense(inner, use_bias=False, dtype=policy, name="up")
        self.down = keras.layers.Dense(d_model, use_bias=False, dtype=policy, name="down")

    def build(self, input_shape):
        super().build(input_shape)
        self.gate.build(input_shape)
        self.up.build(input_shape)
        self.down.build(tuple(input_shape[:-1]) + (self.gate.units,))

    def call(self, x, training=None):
        hidden = ops.multiply(self.gate(x), self.up(x))
        return self.down(self.dropout_layer(hidden, training=training))

    def get_config(self):
        return {**super().get_config(), "activation": self.activation}
