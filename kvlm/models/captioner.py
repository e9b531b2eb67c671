"""Image captioner: an image encoder and a causal Transformer decoder with cross-attention."""

from __future__ import annotations

from typing import Any

import keras
import keras_hub
from keras import ops

from kvlm.models import encoders
from kvlm.models import preset_dir
from kvlm.models.composite import Composite, OwnLoss
from kvlm.models.preprocessor import VLMPreprocessor, check_preprocessor
from kvlm.models.presets import get_preset

SAMPLERS = ("greedy", "beam", "top_k")
# Ids of `[CLS]` and `[SEP]` in every kvlm WordPiece vocabulary (`kvlm.data.tokenizer.RESERVED_TOKENS`):
# a caption is `[CLS] words [SEP]`, padded with `[PAD]` (id 0).
DEFAULT_START_TOKEN_ID = 2
DEFAULT_END_TOKEN_ID = 3
# The captioner's MoE blocks never drop tokens unless asked to: with a capacity limit, a later
# token can take an earlier token's expert slot, so the earlier token's output would depend on
# the future (the decoder would no longer be causal) and generation would not match teacher forcing.
_MOE_DEFAULTS = {"capacity_factor": None, "eval_capacity_factor": None}
_NEG_INF = -1e9


@keras.saving.register_keras_serializable(package="kvlm")
class CaptionDecoder(keras.layers.Layer):
    """Causal text decoder attending to image tokens; returns next-token logits.

    keras-hub `TokenAndPositionEmbedding`, then `num_layers` keras-hub `TransformerDecoder`
    layers (pre-norm, causal self-attention with a padding mask on id 0, cross-attention
    over every image token), a final layer norm and a float32 linear head over the
    vocabulary.

    keras-hub's `TransformerDecoder` builds its own dense feed-forward block and cannot
    take another one, so with `moe` each decoder layer is followed by a pre-norm residual
    `kvlm.layers.SparseMoE` block, `x + moe(layer_norm(x))`, routing only non-padding
    tokens (text modality). Unless `moe` sets them, the MoE capacity factors are `None`
    (no token dropping), which keeps the decoder causal.

    Args:
        vocabulary_size: Number of token ids (0 is padding).
        sequence_length: Longest token sequence (size of the position table).
        hidden_dim, num_heads, intermediate_dim: Transformer sizes.
        num_layers: Number of decoder layers.
        dropout: Dropout rate inside the decoder layers.
        moe: Optional `kvlm.layers.SparseMoE` arguments for the residual MoE blocks.

    Call args:
        token_ids: int `(batch, length)`, `length <= sequence_length`.
        image_tokens: `(batch, num_image_tokens, hidden_dim)`.

    Output: float32 logits `(batch, length, vocabulary_size)`.
    """

    def __init__(
        self,
        vocabulary_size: int,
        sequence_length: int,
        hidden_dim: int,
        num_heads: int,
        intermediate_dim: int,
        num_layers: int,
        dropout: float = 0.0,
        moe: dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if vocabulary_size < 2:
            raise ValueError(f"`vocabulary_size` must be >= 2. Received: vocabulary_size={vocabulary_size}")
        if sequence_length < 2:
            raise ValueError(f"`sequence_length` must be >= 2. Received: sequence_length={sequence_length}")
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1. Received: num_layers={num_layers}")
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.num_layers = num_layers
        self.dropout = dropout
        self.moe = None if moe is None else dict(moe)
        policy = self.dtype_policy
        self.embedding = keras_hub.layers.TokenAndPositionEmbedding(
            vocabulary_size, sequence_length, hidden_dim, dtype=policy, name="token_embedding"
        )
        self.decoder_layers = [
            keras_hub.layers.TransformerDecoder(
                intermediate_dim, num_heads, dropout=dropout, activation="gelu",
                layer_norm_epsilon=1e-6, normalize_first=True, dtype=policy, name=f"decoder_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.moe_norms, self.moe_layers = [], []
        if self.moe is not None:
            from kvlm.layers.moe import SparseMoE

            options = {**_MOE_DEFAULTS, **self.moe}
            for i in range(num_layers):
                self.moe_norms.append(
                    keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name=f"moe_norm_{i}")
                )
                self.moe_layers.append(SparseMoE(**options, dtype=policy, name=f"moe_{i}"))
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="final_norm")
        self.lm_head = keras.layers.Dense(vocabulary_size, dtype="float32", name="lm_head")

    def build(self, token_ids_shape, image_tokens_shape=None):
        if image_tokens_shape is None:
            image_tokens_shape = (token_ids_shape[0], None, self.hidden_dim)
        self.embedding.build(token_ids_shape)
        hidden_shape = tuple(token_ids_shape) + (self.hidden_dim,)
        for layer in self.decoder_layers:
            layer.build(hidden_shape, image_tokens_shape)
        for norm, moe in zip(self.moe_norms, self.moe_layers):
            norm.build(hidden_shape)
            moe.build(hidden_shape)
        self.final_norm.build(hidden_shape)
        self.lm_head.build(hidden_shape)

    def hidden_states(self, token_ids, image_tokens, training=None):
        """Final normalized decoder states `(batch, length, hidden_dim)`."""
        padding_mask = ops.not_equal(token_ids, 0)
        x = self.embedding(token_ids)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(
                x, image_tokens, decoder_padding_mask=padding_mask, use_causal_mask=True, training=training
            )
            if self.moe_layers:
                modality = ops.ones_like(token_ids, dtype="int32")
                x = x + self.moe_layers[i](
                    self.moe_norms[i](x), mask=padding_mask, modality=modality, training=training
                )
        return self.final_norm(x)

    def call(self, token_ids, image_tokens, training=None):
        return self.lm_head(self.hidden_states(token_ids, image_tokens, training=training))

    def compute_output_shape(self, token_ids_shape, image_tokens_shape=None):
        return tuple(token_ids_shape) + (self.vocabulary_size,)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocabulary_size=self.vocabulary_size,
            sequence_length=self.sequence_length,
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            num_layers=self.num_layers,
            dropout=self.dropout,
            moe=self.moe,
        )
        return config


def get_sampler(sampler, num_beams: int = 4, k: int = 5, temperature: float = 1.0, seed: int | None = None):
    """A keras-hub sampler from `"greedy"`, `"beam"` or `"top_k"` (an instance passes through)."""
    if isinstance(sampler, keras_hub.samplers.Sampler):
        return sampler
    if sampler == "greedy":
        return keras_hub.samplers.GreedySampler()
    if sampler == "beam":
        return keras_hub.samplers.BeamSampler(num_beams=num_beams, temperature=temperature)
    if sampler == "top_k":
        return keras_hub.samplers.TopKSampler(k=k, seed=seed, temperature=temperature)
    raise ValueError(
        f"`sampler` must be one of {SAMPLERS} or a keras_hub.samplers.Sampler. Received: sampler={sampler!r}"
    )


@keras.saving.register_keras_serializable(package="kvlm")
class Captioner(OwnLoss, Composite, keras.Model):
    """Image captioner: an image encoder feeds a causal Transformer decoder.

    `image_encoder` (a `ViTEncoder` or `CNNEncoder`) turns each image into
    `(num_image_tokens, hidden_dim)` tokens; `decoder` (a `CaptionDecoder`: keras-hub
    `TokenAndPositionEmbedding` and `TransformerDecoder` layers with cross-attention to the
    image tokens, optional residual SparseMoE blocks) predicts the next WordPiece token at
    every position.

    A functional `keras.Model` taking `{"images", "token_ids"}` and returning float32
    logits `(batch, sequence_length, vocabulary_size)`; the logits at position `t` score
    the token at `t + 1`. Captions are `[CLS] words [SEP]` padded with 0
    (`kvlm.data.make_caption_dataset` builds them).

    Training is teacher forcing with plain `compile` / `fit` / `evaluate`; `compile` takes
    no `loss`: the model's loss is the token cross-entropy of `y` (the next-token ids,
    `token_ids` shifted left by one) averaged over the non-padding targets, plus any MoE
    auxiliary losses. Without `y`, the targets are taken from `x["token_ids"]`.

    `generate` samples captions with keras-hub samplers; see `kvlm.models.captioning`
    for strings and BLEU.

    Args:
        image_encoder: The image encoder layer (with an `image_size`).
        decoder: A `CaptionDecoder`; its `sequence_length` is the longest caption including
            its start and end tokens.
        start_token_id, end_token_id: Ids that begin and end a caption (`[CLS]`, `[SEP]`).
        preprocessor: Optional `VLMPreprocessor` (tokenizer, image size) saved with the model.

    Example:
        >>> model = Captioner.from_preset("kvlm_tiny", vocabulary_size=100, sequence_length=32)
        >>> model.compile(optimizer="adam")
    """

    LOSS = "its own masked next-token cross-entropy"
    PARTS = ("image_encoder", "decoder", "preprocessor")
    OPTIONS = ("start_token_id", "end_token_id")

    def __init__(
        self,
        image_encoder: keras.layers.Layer,
        decoder: CaptionDecoder,
        start_token_id: int = DEFAULT_START_TOKEN_ID,
        end_token_id: int = DEFAULT_END_TOKEN_ID,
        preprocessor: VLMPreprocessor | None = None,
        **kwargs,
    ):
        check_preprocessor(preprocessor, image_encoder.image_size, decoder.sequence_length)
        for arg, value in (("start_token_id", start_token_id), ("end_token_id", end_token_id)):
            if not 0 < value < decoder.vocabulary_size:
                raise ValueError(
                    f"`{arg}` must be a non-padding id below `vocabulary_size`. "
                    f"Received: {arg}={value}, vocabulary_size={decoder.vocabulary_size}"
                )
        if start_token_id == end_token_id:
            raise ValueError(
                "`start_token_id` and `end_token_id` must differ. "
                f"Received: start_token_id={start_token_id}, end_token_id={end_token_id}"
            )
        image_size = image_encoder.image_size
        images = keras.Input((image_size, image_size, 3), dtype="float32", name="images")
        token_ids = keras.Input((decoder.sequence_length,), dtype="int32", name="token_ids")
        logits = decoder(token_ids, image_encoder(images))
        super().__init__(inputs={"images": images, "token_ids": token_ids}, outputs=logits, **kwargs)
        self.image_encoder = image_encoder
        self.decoder = decoder
        self.preprocessor = preprocessor
        self.start_token_id = start_token_id
        self.end_token_id = end_token_id

    @classmethod
    def from_preset(cls, preset: str, vocabulary_size: int | None = None, **overrides) -> "Captioner":
        """A captioner with a built-in preset's image encoder and sizes (`overrides` replace any
        of them), or the captioner saved in the preset folder `preset`.

        The decoder depth (`num_decoder_layers`) defaults to the preset's `num_fusion_layers`,
        the depth of its image-text stack; `moe` gives the decoder residual SparseMoE blocks.
        """
        if preset_dir.is_preset_dir(preset):
            return preset_dir.load_preset(preset, cls)
        preset_dir.require(preset, vocabulary_size=vocabulary_size)
        sizes, options = encoders.preset_sizes(preset, overrides)
        dtype = options.pop("dtype", None)
        num_layers = options.pop("num_decoder_layers", get_preset(preset)["num_fusion_layers"])
        decoder = CaptionDecoder(
            vocabulary_size, sizes["sequence_length"], sizes["hidden_dim"], sizes["num_heads"],
            sizes["intermediate_dim"], num_layers, sizes["dropout"], moe=options.pop("moe", None),
            dtype=dtype, name="decoder",
        )
        return cls(encoders.image_encoder(sizes, dtype), decoder, **options)

    @property
    def image_size(self) -> int:
        return self.image_encoder.image_size

    @property
    def sequence_length(self) -> int:
        return self.decoder.sequence_length

    @property
    def vocabulary_size(self) -> int:
        return self.decoder.vocabulary_size

    @property
    def num_decoder_layers(self) -> int:
        return self.decoder.num_layers

    # -- training -------------------------------------------------------------------------

    @staticmethod
    def next_token_targets(token_ids):
        """`token_ids` shifted left by one, padded with 0: the teacher-forcing targets."""
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        return ops.pad(token_ids[:, 1:], [[0, 0], [0, 1]])

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y is None:
            y = self.next_token_targets(x["token_ids"])
        y = ops.cast(y, "int32")
        logits = ops.cast(y_pred, "float32")
        token_loss = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
        weights = ops.cast(ops.not_equal(y, 0), "float32")
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))
        total = ops.sum(token_loss * weights) / ops.maximum(ops.sum(weights), 1.0)
        for extra in self.losses:
            total = total + self._aggregate_additional_loss(extra)
        return total

    # -- generation -----------------------------------------------------------------------

    def image_tokens(self, images, training=False):
        """The image encoder's tokens `(batch, num_image_tokens, hidden_dim)`."""
        return self.image_encoder(images, training=training)

    def generate_token_ids(self, images, max_length: int | None = None, sampler="greedy"):
        """Backend tensor version of `generate` (traceable: used inside exported graphs)."""
        max_length = self.sequence_length if max_length is None else int(max_length)
        if not 2 <= max_length <= self.sequence_length:
            raise ValueError(
                f"`max_length` must be in [2, sequence_length={self.sequence_length}]. "
                f"Received: max_length={max_length}"
            )
        sampler = get_sampler(sampler)
        decoder = self.decoder
        images = ops.convert_to_tensor(images, "float32")
        image_tokens = self.image_tokens(images)
        batch = ops.shape(images)[0]
        prompt = ops.concatenate(
            [
                ops.full((batch, 1), self.start_token_id, dtype="int32"),
                ops.zeros((batch, max_length - 1), dtype="int32"),
            ],
            axis=1,
        )
        given = ops.concatenate(
            [ops.ones((batch, 1), dtype="bool"), ops.zeros((batch, max_length - 1), dtype="bool")], axis=1
        )
        vocabulary = ops.arange(self.vocabulary_size)
        # Never emit padding or a second start token; after the end token, only padding.
        banned = ops.logical_or(ops.equal(vocabulary, 0), ops.equal(vocabulary, self.start_token_id))
        pad_only = ops.where(ops.equal(vocabulary, 0), 0.0, _NEG_INF)[None, :]
        positions = ops.arange(max_length)[None, :]

        def next(prompt, cache, index):
            # The whole prefix is decoded again at every step (no key/value cache); the image
            # tokens travel as the sampler's cache so that beam search repeats and reorders them.
            hidden = decoder.hidden_states(prompt, cache, training=False)
            last = ops.take(hidden, index - 1, axis=1)
            logits = ops.cast(decoder.lm_head(last), "float32")
            logits = ops.where(banned[None, :], _NEG_INF, logits)
            done = ops.any(
                ops.logical_and(ops.equal(prompt, self.end_token_id), positions < index), axis=1
            )
            logits = ops.where(done[:, None], pad_only, logits)
            return logits, None, cache

        return sampler(
            next, prompt, cache=image_tokens, index=1, mask=given,
            stop_token_ids=(self.end_token_id,), model=self,
        )

    def generate(self, images, max_length: int | None = None, sampler="greedy"):
        """Generates captions for `images` `(batch, image_size, image_size, 3)` in [0, 1].

        Args:
            images: Float images, as in training.
            max_length: Longest output including the start and end tokens
                (default and maximum: `sequence_length`).
            sampler: `"greedy"`, `"beam"` (4 beams), `"top_k"` (k=5) or any
                `keras_hub.samplers.Sampler` (e.g. `BeamSampler(num_beams=8)`,
                `TopKSampler(k=3, seed=1)`).

        Returns:
            int32 numpy `(batch, max_length)`: the start token, the generated tokens, the
            end token (unless `max_length` was reached first), then 0 (padding).
        """
        import numpy as np

        max_length = self.sequence_length if max_length is None else int(max_length)
        backend = keras.backend.backend()
        if backend not in ("tensorflow", "jax"):
            return np.asarray(ops.convert_to_numpy(self.generate_token_ids(images, max_length, sampler)), "int32")
        # On TensorFlow and JAX the sampling loop is compiled once per (sampler, max_length).
        cache = self.__dict__.setdefault("_generate_functions", {})
        key = (sampler if isinstance(sampler, str) else id(sampler), max_length)
        if key not in cache:
            sampler_object = get_sampler(sampler)
            cache[key] = (sampler_object, self._compiled_generate(max_length, sampler_object))
        images = np.asarray(images, dtype="float32")
        return np.asarray(ops.convert_to_numpy(cache[key][1](images)), "int32")

    def _compiled_generate(self, max_length: int, sampler):
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            return tf.function(lambda x: self.generate_token_ids(x, max_length, sampler), reduce_retracing=True)
        import jax

        model_variables = self.trainable_variables + self.non_trainable_variables

        @jax.jit
        def stateless_generate(state, images):
            sampler_values, model_values = state
            mapping = list(zip(sampler.variables, sampler_values)) + list(zip(model_variables, model_values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                token_ids = self.generate_token_ids(images, max_length, sampler)
            new_sampler_values = []
            for variable, value in zip(sampler.variables, sampler_values):
                new_value = scope.get_current_value(variable)
                new_sampler_values.append(value if new_value is None else new_value)
            return token_ids, new_sampler_values

        def generate(images):
            state = ([v.value for v in sampler.variables], [v.value for v in model_variables])
            token_ids, sampler_values = stateless_generate(state, images)
            for variable, value in zip(sampler.variables, sampler_values):
                variable.assign(value)
            return token_ids

        return generate
