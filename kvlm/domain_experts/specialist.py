"""The model a domain expert trains in, and what it keeps of it."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from kvlm.domain_experts.assembly import (
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
