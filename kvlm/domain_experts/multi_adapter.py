"""Many adapter experts on one frozen base: each example routed on the base's encoders, then run
through the base with its own expert's adapters, words and answer head."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from kvlm.domain_experts.adapters import check_adaptable, per_example_delta, pre_activation, weighted_layers
from kvlm.domain_experts.routing import base_token_ids, question_scores, routing_feature
from kvlm.layers.moe.keys import key_logits


def route(features, keys, thresholds, allowed=None):
    """`(slots, weights)` of a batch of routing `features` under the experts' Gaussian `keys`.

    Int `(batch,)` slots: `e + 1` for the expert whose key gives the example the highest
    log-likelihood among those at or above their `thresholds` (and, with a bool `(batch, experts)`
    `allowed`, among those the example may use); 0 (the base) when none is. Float32 `(batch,)`
    weights: the routed expert's posterior among the experts that admit the example (its key
    likelihoods under equal priors); 1 for the base.
    """
    logits = key_logits(features, keys)
    fits = ops.greater_equal(logits, ops.cast(thresholds, "float32")[None, :])
    if allowed is not None:
        fits = ops.logical_and(fits, ops.cast(allowed, "bool"))
    admitted = ops.where(fits, logits, -1e30)  # finite, so a row nobody admits gives no NaN
    any_fit = ops.any(fits, axis=-1)
    slots = ops.where(any_fit, ops.cast(ops.argmax(admitted, axis=-1), "int32") + 1, 0)
    weights = ops.where(any_fit, ops.exp(ops.max(admitted, axis=-1) - ops.logsumexp(admitted, axis=-1)), 1.0)
    return slots, ops.cast(weights, "float32")


@keras.saving.register_keras_serializable(package="kvlm")
class AdapterExperts(keras.layers.Layer):
    """Answers of a frozen base backbone with adapter experts installed.

    Each example is routed on the base's encoders (`routing_feature`, `route`): to the expert whose
    key fits it best among those whose abstention threshold it passes (and, with input gates,
    whose image key's threshold its image passes and whose question key's threshold its
    question passes: `routing.question_scores` in the installed vocabulary), else to the base. It then
    runs through the whole backbone, where every adapted layer adds its expert's
    low-rank term (`per_example_delta`), its words use the expert's own rows (words it does not
    know, the base's unknown row) and its answers come from the expert's own head; an example
    routed to the base gets the base's answers. Slot 0 of every stacked weight is the base's.

    Args:
        backbone: The base `VLMBackbone` (or its config); frozen.
        experts: The experts' names (slots 1..).
        adapter_shapes: `{layer index: (a shape, b shape)}` of one expert's adapter pair at the
            largest rank installed (`kvlm.domain_experts.adapters.weighted_layers` indices).
        base_vocabulary_size, unknown_id: The base tokenizer's size and unknown id.
        num_words: Words of the installed vocabulary (the base's, then the experts' new ones).
        num_answers: Answers of the installed model.
        num_routing_features: Width of the routing feature.
        input_gates: Whether the image and the question each gate the routing on their own
            (`route_gates`); an expert without image and question keys opens both gates.

    Input: `{"images", "token_ids"}` in the installed vocabulary. Output: `(batch, num_answers)`
    float32 logits.
    """

    def __init__(self, backbone, experts: Sequence[str], adapter_shapes: dict, base_vocabulary_size: int,
                 unknown_id: int, num_words: int, num_answers: int, num_routing_features: int,
                 input_gates: bool = False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        if num_words < base_vocabulary_size or not 0 <= unknown_id < base_vocabulary_size:
            raise ValueError(f"`num_words` must be >= base_vocabulary_size > unknown_id. Received: num_words={num_words}, "
                             f"base_vocabulary_size={base_vocabulary_size}, unknown_id={unknown_id}")
        self.backbone = backbone
        self.backbone.trainable = False
        self.experts = list(experts)
        # (layer index, a shape, b shape), sorted by index: lists, as TensorFlow's tracking needs.
        self.adapted = [(int(k), tuple(a), tuple(b)) for k, (a, b) in sorted(adapter_shapes.items(), key=lambda i: int(i[0]))]
        self.base_vocabulary_size = base_vocabulary_size
        self.unknown_id = unknown_id
        self.num_words = num_words
        self.num_answers = num_answers
        self.num_routing_features = num_routing_features
        self.input_gates = bool(input_gates)
        self._routing = threading.local()

    def build(self, input_shape=None):
        slots, d = 1 + len(self.experts), self.backbone.hidden_dim
        weight = lambda shape, name, **kw: self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                                           name=name, **kw)
        layers = weighted_layers(self.backbone)
        self.adapter_a, self.adapter_b = [], []
        for position, (index, a_shape, b_shape) in enumerate(self.adapted):
            check_adaptable(layers[index])
            self.adapter_a.append(weight((slots, *a_shape), f"adapter_{index}_a"))
            self.adapter_b.append(weight((slots, *b_shape), f"adapter_{index}_b"))
            self._adapt(layers[index], position)
        self.word_rows = None
        if self.num_words > self.base_vocabulary_size:
            self.word_rows = weight((slots, self.num_words - self.base_vocabulary_size, d), "word_rows")
            self._adapt_words(self.backbone.get_layer("text_encoder").embedding.token_embedding)
        self.answer_kernels = weight((slots, d, self.num_answers), "answer_kernels")
        self.answer_biases = weight((slots, self.num_answers), "answer_biases")
        self.router_keys = weight((len(self.experts), self.num_routing_features + 1, self.num_routing_features),
                                  "router_keys", dtype="float32", autocast=False)
        self.thresholds = weight((len(self.experts),), "thresholds", dtype="float32", autocast=False)
        if self.input_gates:
            image = self.num_routing_features // 2
            self.image_keys = weight((len(self.experts), image + 1, image), "image_keys", dtype="float32",
                                     autocast=False)
            self.image_thresholds = weight((len(self.experts),), "image_thresholds", dtype="float32", autocast=False)
            self.question_log_probs = weight((self.num_words, len(self.experts)), "question_log_probs",
                                             dtype="float32", autocast=False)
            self.question_thresholds = weight((len(self.experts),), "question_thresholds", dtype="float32",
                                              autocast=False)

    def adapters(self) -> dict[int, tuple]:
        """`{layer index: (a, b)}` stacked adapter weights, slot first."""
        return {index: (a, b) for (index, _, _), a, b in zip(self.adapted, self.adapter_a, self.adapter_b)}

    def _adapt(self, layer: keras.layers.Layer, position: int) -> None:
        """Makes `layer` add its routed experts' low-rank terms while `call` runs the adapted pass."""
        activation, original = layer.activation, layer.call
        layer.activation = None

        def call(inputs, *args, **kwargs):
            slots = getattr(self._routing, "slots", None)
            if slots is None:
                x = original(inputs, *args, **kwargs)
            else:
                a = ops.take(self.adapter_a[position], slots, axis=0)
                b = ops.take(self.adapter_b[position], slots, axis=0)
                x = pre_activation(layer, inputs) + per_example_delta(layer, inputs, a, b)
            return x if activation is None else activation(x)

        layer.call = call

    def _adapt_words(self, embedding: keras.layers.Layer) -> None:
        """Makes the token embedding give new word ids their routed expert's rows in the adapted pass."""
        original, extra = embedding.call, self.num_words - self.base_vocabulary_size

        def call(token_ids, *args, **kwargs):
            slots = getattr(self._routing, "slots", None)
            token_ids = ops.cast(token_ids, "int32")
            is_new = ops.greater_equal(token_ids, self.base_vocabulary_size)
            rows = original(ops.where(is_new, self.unknown_id, token_ids), *args, **kwargs)
            if slots is None:
                return rows
            row = ops.expand_dims(slots, -1) * extra + ops.clip(token_ids - self.base_vocabulary_size, 0, extra - 1)
            own = ops.take(ops.reshape(self.word_rows, (-1, self.backbone.hidden_dim)), row, axis=0)
            return ops.where(ops.expand_dims(is_new, -1), ops.cast(own, rows.dtype), rows)

        embedding.call = call

    def routed_slots(self, inputs: dict, allowed=None):
        """`(slots, weights)` of `route`: 0 for the base, `e + 1` for expert `e`."""
        token_ids = ops.cast(inputs["token_ids"], "int32")
        base_ids = base_token_ids(token_ids, self.base_vocabulary_size, self.unknown_id)
        features = routing_feature(self.backbone, inputs["images"], base_ids)
        if self.input_gates:
            gates = self.route_gates(features, token_ids)
            allowed = gates if allowed is None else ops.logical_and(ops.cast(allowed, "bool"), gates)
        return route(features, self.router_keys, self.thresholds, allowed)

    def route_gates(self, features, token_ids):
        """Bool `(batch, experts)`: whether each expert's image key admits the image half of the
        routing `features` and its question key the question (`token_ids`, installed vocabulary)."""
        image = key_logits(features[:, : self.num_routing_features // 2], self.image_keys)
        question = question_scores(token_ids, self.question_log_probs)
        return ops.logical_and(ops.greater_equal(image, self.image_thresholds[None]),
                               ops.greater_equal(question, self.question_thresholds[None]))

    def answer(self, inputs: dict, allowed=None):
        """`(logits, slots, weights)`: the answers' float32 logits and where each example was routed
        (`routed_slots`); `allowed`, a bool `(batch, experts)`, restricts the experts each may use."""
        inputs = {"images": ops.convert_to_tensor(inputs["images"]), "token_ids": ops.cast(inputs["token_ids"], "int32")}
        slots, weights = self.routed_slots(inputs, allowed)
        self._routing.slots = slots
        try:
            outputs = self.backbone(inputs)
        finally:
            self._routing.slots = None
        pooled = ops.cast(outputs["pooled_output"], "float32")
        kernels = ops.take(ops.cast(self.answer_kernels, "float32"), slots, axis=0)
        biases = ops.take(ops.cast(self.answer_biases, "float32"), slots, axis=0)
        return ops.einsum("bd,bda->ba", pooled, kernels) + biases, slots, weights

    def call(self, inputs):
        return self.answer(inputs)[0]

    def compute_output_shape(self, input_shape):
        return (input_shape["images"][0], self.num_answers)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            experts=self.experts,
            adapter_shapes={str(k): [list(a), list(b)] for k, a, b in self.adapted},
            base_vocabulary_size=self.base_vocabulary_size,
            unknown_id=self.unknown_id,
            num_words=self.num_words,
            num_answers=self.num_answers,
            num_routing_features=self.num_routing_features,
            input_gates=self.input_gates,
        )
        return config
