"""Fusion of image and text tokens: modality embeddings and joint attention blocks."""

from __future__ import annotations

import inspect

import keras
from keras import ops

IMAGE_MODALITY = 0
TEXT_MODALITY = 1
CLS_MODALITY = 2


@keras.saving.register_keras_serializable(package="kvlm")
class ModalityFusion(keras.layers.Layer):
    """Joins image and text tokens into one sequence led by a learned [CLS] token.

    Each token gets a learned embedding of its modality (image, text, [CLS]).

    Args:
        hidden_dim: Token width of both inputs.

    Call args:
        image_tokens: `(batch, num_image_tokens, hidden_dim)`.
        text_tokens: `(batch, num_text_tokens, hidden_dim)`.
        text_mask: Optional boolean `(batch, num_text_tokens)`, False for padding.

    Returns:
        `(tokens, padding_mask, modality)`: tokens `(batch, 1 + N + L, hidden_dim)`,
        boolean padding mask `(batch, 1 + N + L)` and int32 modality ids of the same shape
        (0 image, 1 text, 2 [CLS]).
    """

    def __init__(self, hidden_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim

    def build(self, image_tokens_shape, text_tokens_shape=None, text_mask_shape=None):
        self.cls_token = self.add_weight(
            shape=(self.hidden_dim,),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="cls_token",
        )
        self.modality_embedding = self.add_weight(
            shape=(3, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="modality_embedding",
        )

    def call(self, image_tokens, text_tokens, text_mask=None):
        batch = ops.shape(image_tokens)[0]
        num_image = ops.shape(image_tokens)[1]
        num_text = ops.shape(text_tokens)[1]
        dtype = image_tokens.dtype
        embed = ops.cast(self.modality_embedding, dtype)
        cls = ops.broadcast_to(ops.cast(self.cls_token, dtype) + embed[CLS_MODALITY], (batch, 1, self.hidden_dim))
        tokens = ops.concatenate(
            [cls, image_tokens + embed[IMAGE_MODALITY], text_tokens + embed[TEXT_MODALITY]], axis=1
        )
        if text_mask is None:
            text_mask = ops.ones((batch, num_text), dtype="bool")
        mask = ops.concatenate(
            [ops.ones((batch, 1 + num_image), dtype="bool"), ops.cast(text_mask, "bool")], axis=1
        )
        modality = ops.concatenate(
            [
                ops.full((batch, 1), CLS_MODALITY, dtype="int32"),
                ops.full((batch, num_image), IMAGE_MODALITY, dtype="int32"),
                ops.full((batch, num_text), TEXT_MODALITY, dtype="int32"),
            ],
            axis=1,
        )
        return tokens, mask, modality

    def compute_output_shape(self, image_tokens_shape, text_tokens_shape, text_mask_shape=None):
        batch, num_image, num_text = image_tokens_shape[0], image_tokens_shape[1], text_tokens_shape[1]
        length = None if num_image is None or num_text is None else 1 + num_image + num_text
        return ((batch, length, self.hidden_dim), (batch, length), (batch, length))

    def compute_output_spec(self, image_tokens, text_tokens, text_mask=None):
        shapes = self.compute_output_shape(image_tokens.shape, text_tokens.shape)
        return (
            keras.KerasTensor(shapes[0], dtype=image_tokens.dtype),
            keras.KerasTensor(shapes[1], dtype="bool"),
            keras.KerasTensor(shapes[2], dtype="int32"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim)
        return config


@keras.saving.register_keras_serializable(package="kvlm")
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward network: Dense(intermediate, gelu) -> Dense(hidden).

    Args:
        hidden_dim: Input and output width.
        intermediate_dim: Hidden width.
        dropout: Dropout rate applied to the output.
    """

    def __init__(self, hidden_dim: int, intermediate_dim: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.inner = keras.layers.Dense(intermediate_dim, activation="gelu", dtype=self.dtype_policy, name="inner")
        self.outer = keras.layers.Dense(hidden_dim, dtype=self.dtype_policy, name="outer")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.outer.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))

    def call(self, x, training=None):
        return self.dropout_layer(self.outer(self.inner(x)), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.hidden_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim, intermediate_dim=self.intermediate_dim, dropout=self.dropout
        )
        return config


@keras.saving.register_keras_serializable(package="kvlm")
class FusionBlock(keras.layers.Layer):
    """Pre-norm Transformer block over the fused image + text sequence.

    Self-attention lets every token attend to every non-padding token of both
    modalities; the feed-forward part is a dense `FeedForward`, or, when `ffn` is a
    layer (e.g. `kvlm.layers.SparseMoE`), that layer, called with the padding mask
    and modality ids.

    Args:
        hidden_dim: Token width.
        num_heads: Attention heads.
        intermediate_dim: Width of the dense feed-forward network.
        dropout: Dropout rate.
        ffn: Optional layer (or its serialized config) replacing the dense feed-forward.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        intermediate_dim: int,
        dropout: float = 0.0,
        ffn: keras.layers.Layer | dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                "`num_heads` must divide `hidden_dim`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        policy = self.dtype_policy
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="attention_norm")
        self.attention = keras.layers.MultiHeadAttention(
            num_heads, hidden_dim // num_heads, dropout=dropout, dtype=policy, name="attention"
        )
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="ffn_norm")
        if isinstance(ffn, dict):
            ffn = keras.saving.deserialize_keras_object(ffn)
        self.is_custom_ffn = ffn is not None
        self.ffn = ffn if ffn is not None else FeedForward(
            hidden_dim, intermediate_dim, dropout, dtype=policy, name="ffn"
        )
        # A routed feed-forward (SparseMoE) also takes the padding mask and the modality ids.
        self.ffn_takes_routing = "modality" in inspect.signature(self.ffn.call).parameters
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=policy)

    def build(self, input_shape):
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ffn_norm.build(input_shape)
        if not self.ffn.built:
            self.ffn.build(input_shape)

    def call(self, x, padding_mask=None, modality=None, training=None):
        x = self.attend(x, padding_mask, training)
        h = self.ffn_norm(x)
        if self.ffn_takes_routing:
            h = self.ffn(h, mask=padding_mask, modality=modality, training=training)
        else:
            h = self.ffn(h, training=training)
        return x + h

    def attend(self, x, padding_mask=None, training=None):
        """The attention half of the block: `x` plus self-attention over its non-padding tokens.

        `ffn_norm(attend(x))` is what the feed-forward part (or a `SparseMoE`) reads.
        """
        attention_mask = None
        if padding_mask is not None:
            attention_mask = ops.expand_dims(ops.cast(padding_mask, "bool"), 1)
        h = self.attention_norm(x)
        h = self.attention(h, h, attention_mask=attention_mask, training=training)
        return x + self.dropout_layer(h, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            dropout=self.dropout,
            ffn=keras.saving.serialize_keras_object(self.ffn) if self.is_custom_ffn else None,
        )
        return config
