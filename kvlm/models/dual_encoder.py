"""Contrastive dual encoder: image and text towers mapped to one embedding space."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kvlm.layers import TextEncoder
from kvlm.models import encoders
from kvlm.models import preset_dir
from kvlm.models.composite import Composite, OwnLoss
from kvlm.models.contrastive import (
    DEFAULT_BIAS,
    DEFAULT_TEMPERATURE,
    LOSSES,
    ContrastiveLogits,
    get_loss,
)
from kvlm.models.preprocessor import VLMPreprocessor, check_preprocessor

IMAGE_POOLINGS = ("attention", "mean")


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
class DualEncoder(OwnLoss, Composite, keras.Model):
    """Image and text towers trained with a contrastive loss (CLIP or SigLIP).

    Image tower: `image_encoder` (a `ViTEncoder` or `CNNEncoder`, or any layer with an
    `image_size` mapping images to `(batch, tokens, dim)`), pooled over its tokens
    (`image_pooling`), a linear projection to `embedding_dim` and L2 normalisation.
    Text tower: `text_encoder` (a `TextEncoder`), mean-pooled over the non-padding tokens
    (id 0 is padding), a linear projection to `embedding_dim` and L2 normalisation.

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
        image_encoder: The image encoder layer.
        text_encoder: A `kvlm.layers.TextEncoder`.
        embedding_dim: Width of the shared embedding space.
        loss: `"clip"` (symmetric InfoNCE) or `"siglip"` (pairwise sigmoid).
        initial_temperature: Starting temperature; default 0.07 (clip) or 0.1 (siglip).
        initial_bias: SigLIP only: starting logit bias; default -10.
        image_pooling: `"mean"` (default) or `"attention"` (a learned query, as SigLIP's MAP head).
        pooling_heads: Heads of the attention pooling.
        preprocessor: Optional `VLMPreprocessor` (tokenizer, image size) saved with the model.

    Example:
        >>> model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=100, loss="siglip")
        >>> model.compile(optimizer="adam")
    """

    LOSS = "its own contrastive loss (chosen with `DualEncoder(loss=...)`)"
    PARTS = ("image_encoder", "text_encoder", "preprocessor")
    OPTIONS = ("embedding_dim", "initial_temperature", "initial_bias", "image_pooling", "pooling_heads")

    def __init__(
        self,
        image_encoder: keras.layers.Layer,
        text_encoder: TextEncoder,
        embedding_dim: int = 64,
        loss: str = "clip",
        initial_temperature: float | None = None,
        initial_bias: float | None = None,
        image_pooling: str = "mean",
        pooling_heads: int = 4,
        preprocessor: VLMPreprocessor | None = None,
        **kwargs,
    ):
        check_preprocessor(preprocessor, image_encoder.image_size, text_encoder.sequence_length)
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

        image_size, sequence_length = image_encoder.image_size, text_encoder.sequence_length
        images = keras.Input((image_size, image_size, 3), dtype="float32", name="images")
        token_ids = keras.Input((sequence_length,), dtype="int32", name="token_ids")
        policy = image_encoder.dtype_policy
        if image_pooling == "attention":
            image_pool = AttentionPooling(pooling_heads, dtype=policy, name="image_pooling")
        else:
            image_pool = MaskedMeanPooling(dtype=policy, name="image_pooling")
        text_pool = MaskedMeanPooling(dtype=text_encoder.dtype_policy, name="text_pooling")
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
            **kwargs,
        )
        # Not part of the functional graph: used by `compute_loss` and saved as `logit_head`.
        self.logit_head = ContrastiveLogits(
            initial_temperature, initial_bias, dtype="float32", name="logit_head"
        )
        self.logit_head.build()
        self.contrastive_loss = get_loss(loss)

        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.preprocessor = preprocessor
        self.embedding_dim = embedding_dim
        self.loss_type = loss
        self.initial_temperature = float(initial_temperature)
        self.initial_bias = None if initial_bias is None else float(initial_bias)
        self.image_pooling = image_pooling
        self.pooling_heads = pooling_heads

    @classmethod
    def from_preset(
        cls, preset: str, vocabulary_size: int | None = None, embedding_dim: int = 64, loss: str = "clip",
        **overrides,
    ) -> "DualEncoder":
        """A dual encoder with a built-in preset's encoders, or the one saved in the folder `preset`.

        `overrides` replace encoder sizes or set other arguments; the preset's fusion
        settings (`num_fusion_layers`) do not apply and are ignored.
        """
        if preset_dir.is_preset_dir(preset):
            return preset_dir.load_preset(preset, cls)
        preset_dir.require(preset, vocabulary_size=vocabulary_size)
        sizes, options = encoders.preset_sizes(preset, overrides)
        dtype = options.pop("dtype", None)
        return cls(
            encoders.image_encoder(sizes, dtype), encoders.text_encoder(vocabulary_size, sizes, dtype),
            embedding_dim=embedding_dim, loss=loss, pooling_heads=sizes["num_heads"], **options,
        )

    @property
    def image_size(self) -> int:
        return self.image_encoder.image_size

    @property
    def sequence_length(self) -> int:
        return self.text_encoder.sequence_length

    @property
    def vocabulary_size(self) -> int:
        return self.text_encoder.vocabulary_size

    # -- training -------------------------------------------------------------------------

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
        return {**super().get_config(), "loss": self.loss_type}
