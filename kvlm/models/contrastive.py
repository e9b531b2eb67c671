"""Contrastive image-text losses and the learned similarity head (keras.ops only).

Both losses take `y_pred`, the `(batch, batch)` matrix of pair logits
`z[i, j] = sim(image_i, text_j) / temperature (+ bias)` made by `ContrastiveLogits`,
and `y_true`, one pair id per row: image `i` and text `j` form a positive pair when
`y_true[i] == y_true[j]`. With distinct ids (e.g. `arange(batch)`), the positives are
the diagonal, as in CLIP and SigLIP. Giving each pair the id of its caption makes every
image whose caption is identical to text `j`'s a positive of text `j` (and vice versa),
so repeated captions in a batch are not treated as negatives.

- `CLIPLoss`: symmetric InfoNCE (CLIP, Radford et al. 2021). Each row (image -> texts)
  and each column (text -> images) is a softmax cross-entropy whose target spreads
  evenly over that row's / column's positives; the loss of pair `k` is the mean of its
  image->text and text->image terms, and the batch loss is the mean over pairs.
- `SigLIPLoss`: pairwise sigmoid loss (SigLIP, Zhai et al. 2023):
  `-(1/batch) * sum_ij log sigmoid(label_ij * z_ij)` with `label_ij = +1` for positives
  and `-1` otherwise.
"""

from __future__ import annotations

import math

import keras
from keras import ops

LOSSES = ("clip", "siglip")
# Initial temperature and bias of each loss, as in the CLIP and SigLIP papers.
DEFAULT_TEMPERATURE = {"clip": 0.07, "siglip": 0.1}
DEFAULT_BIAS = {"clip": None, "siglip": -10.0}


def positive_mask(pair_ids, batch_size=None):
    """`(batch, batch)` float32 mask of positive pairs: `pair_ids[i] == pair_ids[j]`.

    `pair_ids=None` gives the identity (only the diagonal is positive); `batch_size`
    is then required.
    """
    if pair_ids is None:
        return ops.eye(batch_size, dtype="float32")
    pair_ids = ops.reshape(pair_ids, (-1,))
    return ops.cast(ops.equal(pair_ids[:, None], pair_ids[None, :]), "float32")


def clip_loss(logits, positives):
    """Per-pair symmetric InfoNCE, `(batch,)`, from logits and a positive mask."""
    logits = ops.cast(logits, "float32")
    row_targets = positives / ops.sum(positives, axis=1, keepdims=True)
    col_targets = positives / ops.sum(positives, axis=0, keepdims=True)
    image_to_text = -ops.sum(row_targets * ops.log_softmax(logits, axis=1), axis=1)
    text_to_image = -ops.sum(col_targets * ops.log_softmax(logits, axis=0), axis=0)
    return 0.5 * (image_to_text + text_to_image)


def siglip_loss(logits, positives):
    """Per-image pairwise sigmoid loss, `(batch,)`: `sum_j -log sigmoid(label_ij * z_ij)`."""
    logits = ops.cast(logits, "float32")
    labels = 2.0 * positives - 1.0
    # -log(sigmoid(x)) == softplus(-x), computed stably.
    return ops.sum(ops.softplus(-labels * logits), axis=1)


class _ContrastiveLoss(keras.losses.Loss):
    """A Keras loss over `(batch, batch)` logits with pair ids as `y_true`."""

    _per_pair = None

    def __init__(self, name=None, reduction="sum_over_batch_size", dtype="float32"):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return type(self)._per_pair(y_pred, positive_mask(y_true, ops.shape(y_pred)[0]))


@keras.saving.register_keras_serializable(package="kvlm")
class CLIPLoss(_ContrastiveLoss):
    """Symmetric InfoNCE over a `(batch, batch)` logit matrix; `y_true` are pair ids."""

    _per_pair = staticmethod(clip_loss)

    def __init__(self, name="clip_loss", **kwargs):
        super().__init__(name=name, **kwargs)


@keras.saving.register_keras_serializable(package="kvlm")
class SigLIPLoss(_ContrastiveLoss):
    """Pairwise sigmoid loss over a `(batch, batch)` logit matrix; `y_true` are pair ids."""

    _per_pair = staticmethod(siglip_loss)

    def __init__(self, name="siglip_loss", **kwargs):
        super().__init__(name=name, **kwargs)


def get_loss(name: str) -> keras.losses.Loss:
    """`"clip"` -> `CLIPLoss()`, `"siglip"` -> `SigLIPLoss()`."""
    if name == "clip":
        return CLIPLoss()
    if name == "siglip":
        return SigLIPLoss()
    raise ValueError(f"`loss` must be one of {LOSSES}. Received: loss={name!r}")


@keras.saving.register_keras_serializable(package="kvlm")
class ContrastiveLogits(keras.layers.Layer):
    """Pair logits `image @ text.T / temperature (+ bias)` with a learned temperature and bias.

    The temperature is learned as the weight `log_temperature`; the logit scale
    `1 / temperature` is capped at `max_scale` (CLIP caps it at 100). `initial_bias=None`
    means no bias (CLIP); a float adds a learned scalar `logit_bias` starting there
    (SigLIP starts at -10).

    Args:
        initial_temperature: Starting temperature (> 0).
        initial_bias: Starting bias, or `None` for no bias.
        max_scale: Largest logit scale `1 / temperature`.

    Call arguments: `image_embeddings` `(n, d)`, `text_embeddings` `(m, d)`.
    Output: float32 `(n, m)` logits.
    """

    def __init__(
        self,
        initial_temperature: float = 0.07,
        initial_bias: float | None = None,
        max_scale: float = 100.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not initial_temperature > 0:
            raise ValueError(
                f"`initial_temperature` must be > 0. Received: initial_temperature={initial_temperature}"
            )
        if not max_scale > 0:
            raise ValueError(f"`max_scale` must be > 0. Received: max_scale={max_scale}")
        self.initial_temperature = float(initial_temperature)
        self.initial_bias = None if initial_bias is None else float(initial_bias)
        self.max_scale = float(max_scale)

    def build(self, input_shape=None):
        self.log_temperature = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(self.initial_temperature)),
            name="log_temperature", dtype="float32",
        )
        self.logit_bias = None
        if self.initial_bias is not None:
            self.logit_bias = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(self.initial_bias), name="logit_bias",
                dtype="float32",
            )
        self.built = True

    def scale(self):
        """The current logit scale `min(1 / temperature, max_scale)`."""
        return ops.minimum(ops.exp(-self.log_temperature), self.max_scale)

    def call(self, image_embeddings, text_embeddings):
        image_embeddings = ops.cast(image_embeddings, "float32")
        text_embeddings = ops.cast(text_embeddings, "float32")
        logits = ops.matmul(image_embeddings, ops.transpose(text_embeddings)) * self.scale()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

    def compute_output_shape(self, image_shape, text_shape):
        return (image_shape[0], text_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(
            initial_temperature=self.initial_temperature,
            initial_bias=self.initial_bias,
            max_scale=self.max_scale,
        )
        return config
