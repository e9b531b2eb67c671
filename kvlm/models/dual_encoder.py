"""Contrastive dual encoder: image and text towers mapped to one embedding space."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kvlm.models import encoders
from kvlm.models.contrastive import (
    DEFAULT_BIAS,
    DEFAULT_TEMPERATURE,
    LOSSES,
    ContrastiveLogits,
    get_loss,
)
from kvlm.models.presets import get_preset

IMAGE_POOLINGS = ("attention", "mean")
# Preset keys that configure the fusion stack, which a dual encoder does not have.
_FUSION_KEYS = ("num_fusion_layers", "moe")


@keras.saving.register_keras_serializable(package="kvlm")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean of `(batch, tokens, dim)` features over the tokens where `mask` is true.

    A row without any true mask entry pools to zeros. Without a mask, all tokens count.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x, mask=None):
        if mask is None:
            return ops.mean(x, axis=1)
        weights = ops.cast(mask, x.dtype)[:, :, None]
        total = ops.sum(x * weights, axis=1)
        return total / ops.maximum(ops.sum(weights, axis=1), ops.cast(1.0, x.dtype))

    def compute_mask(self, x, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


@keras.saving.register_keras_serializable(package="kvlm")
class AttentionPooling(keras.layers.Layer):
    """Multi-head attention pooling: one learned query attends over the tokens (SigLIP's MAP head).

    Args:
        num_heads: Attention heads; the token width must be divisible by it.

    Input shape: `(batch, tokens, dim)`. Output shape: `(batch, dim)`.
    """

    def __init__(self, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1:
            raise ValueError(f"`num_heads` must be >= 1. Received: num_heads={num_heads}")
        self.num_heads = num_heads

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim % self.num_heads:
            raise ValueError(
                f"Token width must be divisible by `num_heads`. Received: dim={dim}, num_heads={self.num_heads}"
            )
        self.query = self.add_weight(
            shape=(1, 1, dim), initializer=keras.initializers.RandomNormal(stddev=0.02), name="query"
        )
        self.attention = keras.layers.MultiHeadAttention(
            self.num_heads, dim // self.num_heads, dtype=self.dtype_policy, name="attention"
        )
        self.attention.build((input_shape[0], 1, dim), input_shape)
        self.layer_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=self.dtype_policy, name="layer_norm")
        self.layer_norm.build((input_shape[0], dim))

    def call(self, x):
        query = ops.tile(ops.cast(self.query, x.dtype), (ops.shape(x)[0], 1, 1))
        pooled = self.attention(query, x)[:, 0, :]
        return self.layer_norm(pooled)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads)
        return config


@keras.saving.register_keras_serializable(package="kvlm")
class DualEncoder(keras.Model):
    """Image and text towers trained with a contrastive loss (CLIP or SigLIP).

    Image tower: the preset's image encoder (`"vit"` or `"cnn"`), pooled over its tokens
    (`image_pooling`), a linear projection to `embedding_dim` and L2 normalisation.
    Text tower: `TextEncoder`, mean-pooled over the non-padding tokens (id 0 is padding),
    a linear projection to `embedding_dim` and L2 normalisation.

    A functional `keras.Model` taking `{"images", "token_ids"}` and returning
    `{"image_embedding", "text_embedding"}`, float32 `(batch, embedding_dim)` unit
    vectors. `predict` returns both embeddings for a dataset of pairs.

    Training is plain `compile` / `fit` / `evaluate`: `compile` takes no `loss`; the
    model's own contrastive loss (chosen by `loss`) is computed in `compute_loss` from
    the batch's `(batch, batch)` pair logits made by a learned temperature (and, for
    SigLIP, a learned bias), `logit_head`. The targets `y` are pair ids: image `i` and
    text `j` of a batch are a positive pair when `y[i] == y[j]` (e.g. the index of each
    pair's caption, so that images with identical captions are positives of each
    other); without `y`, the positives are the diagonal. Negatives come from the batch,
    so shuffle the training data.

    Args:
        vocabulary_size: Number of text token ids (0 is padding).
        embedding_dim: Width of the shared embedding space.
        loss: `"clip"` (symmetric InfoNCE) or `"siglip"` (pairwise sigmoid).
        initial_temperature: Starting temperature; default 0.07 (clip) or 0.1 (siglip).
        initial_bias: SigLIP only: starting logit bias; default -10.
        image_pooling: `"mean"` (default) or `"attention"` (a learned query, as SigLIP's MAP head).
        image_size, encoder, patch_size, cnn_filters, cnn_stages, sequence_length,
        hidden_dim, num_heads, intermediate_dim, num_image_layers, num_text_layers,
        dropout: Encoder sizes, as for `VLMBackbone`.

    Example:
        >>> model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=100, loss="siglip")
        >>> model.compile(optimizer="adam")
    """

    def __init__(
        self,
        vocabulary_size: int,
        embedding_dim: int = 64,
        loss: str = "clip",
        initial_temperature: float | None = None,
        initial_bias: float | None = None,
        image_pooling: str = "mean",
        image_size: int = 32,
        encoder: str = "vit",
        patch_size: int = 4,
        cnn_filters: int = 32,
        cnn_stages: int = 2,
        sequence_length: int = 16,
        hidden_dim: int = 64,
        num_heads: int = 4,
        intermediate_dim: int = 128,
        num_image_layers: int = 1,
        num_text_layers: int = 1,
        dropout: float = 0.0,
        dtype=None,
        **kwargs,
    ):
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}. Received: loss={loss!r}")
        if image_pooling not in IMAGE_POOLINGS:
            raise ValueError(
                f"`image_pooling` must be one of {IMAGE_POOLINGS}. Received: image_pooling={image_pooling!r}"
            )
        if embedding_dim < 1:
            raise ValueError(f"`embedding_dim` must be >= 1. Received: embedding_dim={embedding_dim}")
        if loss == "clip" and initial_bias is not None:
            raise ValueError(f"The CLIP loss has no bias. Received: loss='clip', initial_bias={initial_bias}")
        if initial_temperature is None:
            initial_temperature = DEFAULT_TEMPERATURE[loss]
        if loss == "siglip" and initial_bias is None:
            initial_bias = DEFAULT_BIAS[loss]

        images = keras.Input((image_size, image_size, 3), dtype="float32", name="images")
        token_ids = keras.Input((sequence_length,), dtype="int32", name="token_ids")
        image_encoder = encoders.image_encoder(
            encoder, image_size, hidden_dim, patch_size=patch_size, cnn_filters=cnn_filters,
            cnn_stages=cnn_stages, num_layers=num_image_layers, num_heads=num_heads,
            intermediate_dim=intermediate_dim, dropout=dropout, dtype=dtype,
        )
        if image_pooling == "attention":
            image_pool = AttentionPooling(num_heads, dtype=dtype, name="image_pooling")
        else:
            image_pool = MaskedMeanPooling(dtype=dtype, name="image_pooling")
        text_encoder = encoders.text_encoder(
            vocabulary_size, sequence_length, hidden_dim, num_layers=num_text_layers, num_heads=num_heads,
            intermediate_dim=intermediate_dim, dropout=dropout, dtype=dtype,
        )
        text_pool = MaskedMeanPooling(dtype=dtype, name="text_pooling")
        # Projections and normalisation in float32, so embeddings are float32 under mixed precision.
        image_projection = keras.layers.Dense(
            embedding_dim, use_bias=False, dtype="float32", name="image_projection"
        )
        text_projection = keras.layers.Dense(
            embedding_dim, use_bias=False, dtype="float32", name="text_projection"
        )
        image_embedding = keras.layers.UnitNormalization(axis=-1, dtype="float32", name="image_embedding")(
            image_projection(image_pool(image_encoder(images)))
        )
        text_mask = ops.not_equal(token_ids, 0)
        text_embedding = keras.layers.UnitNormalization(axis=-1, dtype="float32", name="text_embedding")(
            text_projection(text_pool(text_encoder(token_ids), mask=text_mask))
        )
        super().__init__(
            inputs={"images": images, "token_ids": token_ids},
            outputs={"image_embedding": image_embedding, "text_embedding": text_embedding},
            dtype=dtype,
            **kwargs,
        )
        # Not part of the functional graph: used by `compute_loss` and saved as `logit_head`.
        self.logit_head = ContrastiveLogits(
            initial_temperature, initial_bias, dtype="float32", name="logit_head"
        )
        self.logit_head.build()
        self.contrastive_loss = get_loss(loss)

        self.vocabulary_size = vocabulary_size
        self.embedding_dim = embedding_dim
        self.loss_type = loss
        self.initial_temperature = float(initial_temperature)
        self.initial_bias = None if initial_bias is None else float(initial_bias)
        self.image_pooling = image_pooling
        self.image_size = image_size
        self.encoder = encoder
        self.patch_size = patch_size
        self.cnn_filters = cnn_filters
        self.cnn_stages = cnn_stages
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.num_image_layers = num_image_layers
        self.num_text_layers = num_text_layers
        self.dropout = dropout

    @classmethod
    def from_preset(
        cls, preset: str, vocabulary_size: int, embedding_dim: int = 64, loss: str = "clip", **overrides
    ) -> "DualEncoder":
        """Builds a dual encoder with a preset's encoder sizes; `overrides` replace any argument.

        The preset's fusion settings (`num_fusion_layers`) do not apply and are ignored.
        """
        config = get_preset(preset)
        for key in _FUSION_KEYS:
            config.pop(key, None)
        config.update(overrides)
        return cls(vocabulary_size=vocabulary_size, embedding_dim=embedding_dim, loss=loss, **config)

    # -- training -------------------------------------------------------------------------

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """`keras.Model.compile` without `loss`: the contrastive loss is set by the model."""
        if loss is not None:
            raise ValueError(
                "DualEncoder computes its own contrastive loss (chosen with `DualEncoder(loss=...)`); "
                f"leave `loss` out of compile(). Received: loss={loss!r}"
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def similarity_logits(self, image_embeddings, text_embeddings):
        """`(n, m)` pair logits with the learned temperature (and bias)."""
        return self.logit_head(image_embeddings, text_embeddings)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        logits = self.similarity_logits(y_pred["image_embedding"], y_pred["text_embedding"])
        if y is None:
            y = ops.arange(ops.shape(logits)[0])
        total = self.contrastive_loss(y, logits, sample_weight=sample_weight)
        for extra in self.losses:
            total = total + self._aggregate_additional_loss(extra)
        return total

    @property
    def temperature(self) -> float:
        """The current learned temperature (after the `max_scale` cap)."""
        return 1.0 / float(ops.convert_to_numpy(self.logit_head.scale()))

    # -- towers ---------------------------------------------------------------------------

    def image_model(self) -> keras.Model:
        """A functional model `images -> image_embedding` sharing this model's layers."""
        return keras.Model(self.input["images"], self.output["image_embedding"], name="image_tower")

    def text_model(self) -> keras.Model:
        """A functional model `token_ids -> text_embedding` sharing this model's layers."""
        return keras.Model(self.input["token_ids"], self.output["text_embedding"], name="text_tower")

    def get_config(self) -> dict[str, Any]:
        return {
            **encoders.encoder_config(self),
            "embedding_dim": self.embedding_dim,
            "loss": self.loss_type,
            "initial_temperature": self.initial_temperature,
            "initial_bias": self.initial_bias,
            "image_pooling": self.image_pooling,
            "num_text_layers": self.num_text_layers,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
