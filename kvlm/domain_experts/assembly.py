"""Model surgery on a trained base classifier: the parts a specialist or an installed model swaps
in, and `assemble`, which rebuilds the base's own graph around them."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from kvlm.domain_experts.layers import ExpertAnswerHead, GrownTextEncoder
from kvlm.layers.fusion import FeedForward, FusionBlock


def fusion_blocks(base: keras.Model) -> list[FusionBlock]:
    """The base classifier's fusion blocks, in order."""
    backbone = base.backbone
    return [backbone.get_layer(f"fusion_block_{i}") for i in range(backbone.num_fusion_layers)]


def backbone_copy(base: keras.Model) -> keras.Model:
    """A new backbone with the base classifier's backbone's config and weights (its own layers)."""
    from kvlm.models.backbone import VLMBackbone

    backbone = VLMBackbone.from_config(base.backbone.get_config())
    backbone.set_weights(base.backbone.get_weights())
    return backbone


def branch_block(block: FusionBlock, ffn: keras.layers.Layer, d_model: int) -> FusionBlock:
    """A copy of `block` (attention weights copied, frozen) whose feed-forward is `ffn`."""
    copy = FusionBlock(block.hidden_dim, block.num_heads, block.intermediate_dim, block.dropout, ffn=ffn,
                       dtype=block.dtype_policy, name=block.name)
    copy.build((None, None, d_model))
    for part in ("attention_norm", "attention", "ffn_norm"):
        getattr(copy, part).set_weights(getattr(block, part).get_weights())
        getattr(copy, part).trainable = False
    return copy


def feed_forward(block: FusionBlock, weights: Sequence[np.ndarray] | None, name: str, trainable: bool) -> FeedForward:
    """A `FeedForward` of `block`'s sizes holding `weights` (default: a copy of `block`'s own)."""
    ffn = FeedForward(block.hidden_dim, block.intermediate_dim, block.dropout, dtype=block.dtype_policy, name=name)
    ffn.build((None, block.hidden_dim))
    ffn.set_weights(list(weights) if weights is not None else block.ffn.get_weights())
    ffn.trainable = trainable
    return ffn


def grown_text_encoder(base: keras.Model, extra: int) -> keras.layers.Layer:
    """The base's text encoder, frozen; wrapped in a `GrownTextEncoder` when `extra` words are added."""
    text_encoder = base.backbone.get_layer("text_encoder")
    text_encoder.trainable = False
    if not extra:
        return text_encoder
    grown = GrownTextEncoder(text_encoder, extra, name="grown_text_encoder")
    grown.build((None, base.backbone.sequence_length))
    return grown


def expert_head(base: keras.Model, expert_answers: list[list[int]], keys, base_trainable: bool) -> ExpertAnswerHead:
    """An `ExpertAnswerHead` starting from the base's `logits` layer, with `expert_answers` columns."""
    dense = base.get_layer("logits")
    head = ExpertAnswerHead(base.num_classes, expert_answers, router_keys=keys, base_trainable=base_trainable,
                            dtype="float32", name="answer_head")
    head.build((None, dense.kernel.shape[0]))
    head.base_kernel.assign(ops.convert_to_numpy(dense.kernel))
    head.base_bias.assign(ops.convert_to_numpy(dense.bias))
    return head


def assemble(base: keras.Model, blocks: Sequence[FusionBlock], text_encoder: keras.layers.Layer,
             head: keras.layers.Layer, name: str) -> keras.Model:
    """The base's backbone graph rebuilt by `keras.models.clone_model` with `text_encoder` and
    the fusion `blocks` in place of its own (every other layer shared and frozen), under `head`
    on the pooled output: one flat functional model over `{"images", "token_ids"}`."""
    swapped = {"text_encoder": text_encoder} | {f"fusion_block_{i}": block for i, block in enumerate(blocks)}

    def swap(layer):
        if layer.name in swapped:
            return swapped[layer.name]
        if isinstance(layer, keras.layers.Layer):
            layer.trainable = False
        return layer

    clone = keras.models.clone_model(base.backbone, clone_function=swap)
    return keras.Model(clone.input, head(clone.output["pooled_output"]), name=name)
