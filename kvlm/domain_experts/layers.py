"""Layers through which trained domain experts join a trained base model.

- `GrownTextEncoder`: the base `TextEncoder` with more token ids, for the words a domain
  brings; the base's embeddings and Transformer layers are used unchanged.
- `ExpertAnswerHead`: the base answer head plus each expert's new answers. An expert's
  answers compete only where the head's router picks that expert, so installing an expert
  never changes the answers of inputs routed to the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from kvlm.layers.moe.keys import key_logits, l2_normalize, stored_keys, validate_keys
from kvlm.layers.text_encoder import TextEncoder

# The logit of an answer that is switched off: far below any real logit, finite in float32.
OFF = -1e9


@keras.saving.register_keras_serializable(package="kvlm")
class GrownTextEncoder(keras.layers.Layer):
    """A `TextEncoder` with `extra_vocabulary_size` more token ids.

    Ids below the base's `vocabulary_size` use the base's embedding rows; ids
    `vocabulary_size + j` use row `j` of `extra_embeddings`, this layer's only own weight.
    Position embeddings, the Transformer layers and the padding mask are the base's.

    Args:
        text_encoder: The base `TextEncoder` (or its serialized config).
        extra_vocabulary_size: Number of new token ids, >= 1.

    Input: `(batch, sequence_length)` int ids in `[0, vocabulary_size + extra_vocabulary_size)`.
    Output: `(batch, sequence_length, hidden_dim)`.
    """

    def __init__(self, text_encoder: TextEncoder | dict, extra_vocabulary_size: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(text_encoder, dict):
            text_encoder = keras.saving.deserialize_keras_object(text_encoder)
        if not isinstance(text_encoder, TextEncoder):
            raise ValueError(f"`text_encoder` must be a TextEncoder. Received: text_encoder={text_encoder!r}")
        if isinstance(extra_vocabulary_size, bool) or not isinstance(extra_vocabulary_size, int) or extra_vocabulary_size < 1:
            raise ValueError(
                f"`extra_vocabulary_size` must be an int >= 1. Received: extra_vocabulary_size={extra_vocabulary_size!r}"
            )
        self.text_encoder = text_encoder
        self.extra_vocabulary_size = extra_vocabulary_size
        self.supports_masking = True

    @property
    def vocabulary_size(self) -> int:
        return self.text_encoder.vocabulary_size + self.extra_vocabulary_size

    def build(self, input_shape):
        if not self.text_encoder.built:
            self.text_encoder.build(input_shape)
        self.extra_embeddings = self.add_weight(
            shape=(self.extra_vocabulary_size, self.text_encoder.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="extra_embeddings",
        )

    def call(self, token_ids, training=None):
        encoder = self.text_encoder
        ids = ops.cast(token_ids, "int32")
        is_new = ops.greater_equal(ids, encoder.vocabulary_size)
        base = encoder.embedding.token_embedding(ops.where(is_new, 1, ids))
        rows = ops.clip(ids - encoder.vocabulary_size, 0, self.extra_vocabulary_size - 1)
        new = ops.cast(ops.take(self.extra_embeddings, rows, axis=0), base.dtype)
        tokens = ops.where(ops.expand_dims(is_new, -1), new, base)
        x = tokens + encoder.embedding.position_embedding(tokens)
        return encoder.stack(x, padding_mask=ops.not_equal(ids, 0), training=training)

    def compute_mask(self, token_ids, mask=None):
        return ops.not_equal(token_ids, 0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.text_encoder.hidden_dim)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            text_encoder=keras.saving.serialize_keras_object(self.text_encoder),
            extra_vocabulary_size=self.extra_vocabulary_size,
        )
        return config


@keras.saving.register_keras_serializable(package="kvlm")
class ExpertAnswerHead(keras.layers.Layer):
    """Logits over the base's answers and the answers the experts add.

    Output column `i < num_base_answers` is the base head's answer `i`. Expert `e` scores
    its `len(expert_answers[e])` new answers into the columns `expert_answers[e]` (experts
    may share a new answer: its logit is the highest among the experts that are on). With
    `router_keys` (cosine or Gaussian, see `kvlm.layers.moe.keys`), the pooled feature picks
    one of `1 + experts` keys (0: the base, `e + 1`: expert `e`) and only the picked
    expert's answers are on; the others get logit `OFF`. Without keys every expert's answers are on (a specialist).

    Args:
        num_base_answers: Answers of the base head.
        expert_answers: Per expert, the output columns of its new answers (each
            `>= num_base_answers`; empty for an expert that adds none).
        router_keys: Optional `(1 + experts, d)` or `(1 + experts, d + 1, d)` keys of the pooled feature.
        base_trainable: Whether the base head's kernel and bias train.

    Input: `(batch, d)` pooled features. Output: `(batch, num_answers)` float32 logits.
    """

    def __init__(
        self,
        num_base_answers: int,
        expert_answers: Sequence[Sequence[int]],
        router_keys=None,
        base_trainable: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(num_base_answers, bool) or not isinstance(num_base_answers, int) or num_base_answers < 1:
            raise ValueError(f"`num_base_answers` must be an int >= 1. Received: num_base_answers={num_base_answers!r}")
        expert_answers = [[int(c) for c in columns] for columns in expert_answers]
        if any(columns and min(columns) < num_base_answers for columns in expert_answers):
            raise ValueError(
                "The experts' answers must be in columns >= num_base_answers. "
                f"Received: num_base_answers={num_base_answers}, expert_answers={expert_answers}"
            )
        new_columns = sorted({c for columns in expert_answers for c in columns})
        if new_columns and new_columns != list(range(num_base_answers, num_base_answers + len(new_columns))):
            raise ValueError(
                f"The experts' answers must fill the columns after the base's. Received: expert_answers={expert_answers}"
            )
        if router_keys is not None:
            names = ["base"] + [f"expert_{e}" for e in range(len(expert_answers))]
            router_keys = validate_keys(router_keys, 1 + len(expert_answers), names)
        self.num_base_answers = num_base_answers
        self.expert_answers = expert_answers
        self.num_answers = num_base_answers + len(new_columns)
        self.router_keys = router_keys
        self.base_trainable = base_trainable

    def build(self, input_shape):
        d = input_shape[-1]
        if self.router_keys is not None and self.router_keys.shape[-1] != d:
            raise ValueError(f"`router_keys` must have width {d}. Received: shape {self.router_keys.shape}")
        self.base_kernel = self.add_weight(shape=(d, self.num_base_answers), name="base_kernel",
                                           trainable=self.base_trainable)
        self.base_bias = self.add_weight(shape=(self.num_base_answers,), initializer="zeros", name="base_bias",
                                         trainable=self.base_trainable)
        self.expert_kernels, self.expert_biases = [], []
        for e, columns in enumerate(self.expert_answers):
            self.expert_kernels.append(self.add_weight(shape=(d, len(columns)), initializer="zeros",
                                                       name=f"expert_{e}_kernel"))
            self.expert_biases.append(self.add_weight(shape=(len(columns),), initializer="zeros",
                                                      name=f"expert_{e}_bias"))
        if self.router_keys is not None:
            self.keys = self.add_weight(
                shape=self.router_keys.shape, initializer=keras.initializers.Constant(stored_keys(self.router_keys)),
                trainable=False, dtype="float32", autocast=False, name="router_keys",
            )

    def routed_expert(self, pooled):
        """Int `(batch,)`: 0 for the base, `e + 1` for expert `e` (all 1 without keys and with one expert)."""
        if self.router_keys is None:
            return ops.ones((ops.shape(pooled)[0],), dtype="int32")
        return ops.cast(ops.argmax(key_logits(l2_normalize(pooled), self.keys), axis=-1), "int32")

    def call(self, pooled):
        pooled = ops.cast(pooled, "float32")
        logits = ops.matmul(pooled, ops.cast(self.base_kernel, "float32")) + ops.cast(self.base_bias, "float32")
        num_new = self.num_answers - self.num_base_answers
        if not num_new:
            return logits
        routed = self.routed_expert(pooled)
        new = ops.full((ops.shape(pooled)[0], num_new), OFF, dtype="float32")
        for e, columns in enumerate(self.expert_answers):
            if not columns:
                continue
            scores = ops.matmul(pooled, ops.cast(self.expert_kernels[e], "float32"))
            scores = scores + ops.cast(self.expert_biases[e], "float32")
            if self.router_keys is not None:
                on = ops.expand_dims(ops.equal(routed, e + 1), -1)
                scores = ops.where(on, scores, OFF)
            place = np.zeros((len(columns), num_new), dtype=bool)
            place[np.arange(len(columns)), np.asarray(columns) - self.num_base_answers] = True
            placed = ops.where(ops.convert_to_tensor(place)[None], ops.expand_dims(scores, -1), OFF)
            new = ops.maximum(new, ops.max(placed, axis=1))
        return ops.concatenate([logits, new], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_answers)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_base_answers=self.num_base_answers,
            expert_answers=self.expert_answers,
            router_keys=None if self.router_keys is None else self.router_keys.tolist(),
            base_trainable=self.base_trainable,
        )
        return config
