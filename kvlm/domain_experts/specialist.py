"""The model a domain expert trains in, and what it keeps of it: FFN branches (the first
kind of expert) or adapters through the whole path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from kvlm.domain_experts.adapters import adaptable_indices, enable_adapters, lora_pair, weighted_layers
from kvlm.domain_experts.assembly import (
    backbone_copy,
    assemble,
    branch_block,
    expert_head,
    feed_forward,
    fusion_blocks,
    grown_text_encoder,
)
from kvlm.domain_experts.layers import GrownTextEncoder
from kvlm.layers.fusion import FusionBlock


def specialist_model(base: keras.Model, num_words: int, num_answers: int) -> keras.Model:
    """The model a domain expert trains in.

    `base` (a trained `VLMClassifier`) is frozen; every fusion block gets a trainable branch
    of its FFN, the text encoder `num_words` new embedding rows and the head `num_answers`
    new answer columns after the base's.
    """
    d_model = base.backbone.hidden_dim
    blocks = []
    for i, block in enumerate(fusion_blocks(base)):
        blocks.append(branch_block(block, feed_forward(block, None, name=f"branch_{i}", trainable=True), d_model))
    text_encoder = grown_text_encoder(base, num_words)
    columns = list(range(base.num_classes, base.num_classes + num_answers))
    head = expert_head(base, [columns], None, base_trainable=False)
    return assemble(base, blocks, text_encoder, head, "specialist")


def specialist_weights(model: keras.Model) -> dict[str, Any]:
    """The trained parts of a `specialist_model`: `ffn_weights`, `word_embeddings`, `answer_kernel`, `answer_bias`."""
    blocks = [layer for layer in model.layers if isinstance(layer, FusionBlock)]
    ffn = [[np.asarray(w) for w in block.ffn.get_weights()] for block in blocks]
    head = model.get_layer("answer_head")
    grown = [layer for layer in model.layers if isinstance(layer, GrownTextEncoder)]
    d_model = head.base_kernel.shape[0]
    rows = ops.convert_to_numpy(grown[0].extra_embeddings) if grown else np.zeros((0, d_model), np.float32)
    return {
        "ffn_weights": ffn,
        "word_embeddings": np.asarray(rows),
        "answer_kernel": np.asarray(ops.convert_to_numpy(head.expert_kernels[0])),
        "answer_bias": np.asarray(ops.convert_to_numpy(head.expert_biases[0])),
    }


def adapter_specialist_model(base: keras.Model, num_words: int, answers: Sequence[str], rank: int,
                             targets: Sequence[str] | None = None) -> keras.Model:
    """The model an adapter expert trains in.

    A copy of `base`'s backbone, frozen, with rank-`rank` LoRA adapters on its layers matching
    `targets` (`kvlm.domain_experts.adapters.adaptable_indices`; default all), `num_words` new
    embedding rows and its own answer head over `answers` (initialized from the base's columns
    for the answers the base has, zero for the others).
    """
    backbone = backbone_copy(base)
    indices = adaptable_indices(backbone, targets)
    enable_adapters(backbone, rank, indices)
    layers = weighted_layers(backbone)
    for index in indices:
        layers[index]._adapter_index = index
    text_encoder = backbone.get_layer("text_encoder")
    if num_words:
        text_encoder = GrownTextEncoder(text_encoder, num_words, name="grown_text_encoder")
        text_encoder.build((None, backbone.sequence_length))
    clone = keras.models.clone_model(backbone, clone_function=lambda layer: (
        text_encoder if layer.name == "text_encoder" else layer))
    base_answers = list(base.preprocessor.answers)
    kernel, bias = (ops.convert_to_numpy(w) for w in (base.get_layer("logits").kernel, base.get_layer("logits").bias))
    own = [base_answers.index(a) if a in base_answers else -1 for a in answers]
    head = keras.layers.Dense(len(answers), dtype="float32", name="answer_head")
    head.build((None, backbone.hidden_dim))
    head.set_weights([np.where(np.array(own) >= 0, kernel[:, own], 0.0), np.where(np.array(own) >= 0, bias[own], 0.0)])
    return keras.Model(clone.input, head(clone.output["pooled_output"]), name="adapter_specialist")


def adapter_specialist_weights(model: keras.Model) -> dict[str, Any]:
    """The trained parts of an `adapter_specialist_model`: `adapters` (`{index: (a, b)}`),
    `word_embeddings`, `answer_kernel`, `answer_bias`."""
    adapters = {}
    for layer in model._flatten_layers(include_self=False):
        if hasattr(layer, "_adapter_index"):
            adapters[layer._adapter_index] = lora_pair(layer)
    head = model.get_layer("answer_head")
    grown = [layer for layer in model.layers if isinstance(layer, GrownTextEncoder)]
    rows = ops.convert_to_numpy(grown[0].extra_embeddings) if grown else np.zeros((0, head.kernel.shape[0]), np.float32)
    return {"adapters": adapters, "word_embeddings": np.asarray(rows, np.float32),
            "answer_kernel": ops.convert_to_numpy(head.kernel), "answer_bias": ops.convert_to_numpy(head.bias)}
