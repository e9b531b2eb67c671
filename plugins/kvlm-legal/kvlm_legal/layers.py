"""The legal expert layer."""

from __future__ import annotations

import keras
from keras import ops

from kvlm.experts.layer import ExpertLayer


@keras.saving.register_keras_serializable(package="kvlm_legal")
class LegalExpert(ExpertLayer):
    """Feed-forward expert with a parallel low-rank linear path: `FFN(x) + (x A) B`.

    The low-rank path carries a few directions (layout cues such as "this is a
    signature line") straight through, next to the non-linear feed-forward network.
    Works token by token on inputs of any rank whose last axis is `d_model`.

    Args:
        d_model: Input and output width.
        hidden_dim: Inner width of the feed-forward network; defaults to `2 * d_model`.
        rank: Rank of the linear path, between 1 and `d_model`.
        activation: Activation of the feed-forward network.
        dropout: Dropout rate on the feed-forward activations.
    """

    def __init__(self, d_model: int, hidden_dim: int | None = None, rank: int = 4, activation: str = "relu",
                 dropout: float = 0.0, **kwargs):
        super().__init__(d_model, hidden_dim, dropout, **kwargs)
        if not isinstance(rank, int) or not 1 <= rank <= d_model:
            raise ValueError(f"`rank` must be an integer in [1, d_model={d_model}]. Received: rank={rank}")
        self.rank = rank
        self.activation = self.check_activation(activation)
        policy = self.dtype_policy
        self.inner = keras.layers.Dense(hidden_dim or 2 * d_model, activation=activation, dtype=policy, name="inner")
        self.outer = keras.layers.Dense(d_model, dtype=policy, name="outer")

    def build(self, input_shape):
        super().build(input_shape)
        self.inner.build(input_shape)
        self.outer.build(tuple(input_shape[:-1]) + (self.inner.units,))
        # Both factors start random (not B = 0 as in LoRA) so both get gradients from step one.
        self.down_kernel = self.add_weight(
            shape=(self.d_model, self.rank), initializer="glorot_uniform", name="down_kernel"
        )
        self.up_kernel = self.add_weight(
            shape=(self.rank, self.d_model), initializer="glorot_uniform", name="up_kernel"
        )

    def call(self, x, training=None):
        ffn = self.outer(self.dropout_layer(self.inner(x), training=training))
        low_rank = ops.matmul(ops.matmul(x, self.down_kernel), self.up_kernel)
        return ffn + low_rank

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "activation": self.activation}
