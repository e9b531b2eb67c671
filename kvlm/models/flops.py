"""Parameter counts and analytic per-example forward FLOPs of kvlm models.

FLOPs are counted for the matrix products that dominate compute: dense and
einsum-dense projections, convolutions, and the two attention products
(`QK^T` and `softmax(.)V`). One multiply-add is 2 FLOPs and every bias adds
1 FLOP per output element. Element-wise work (activations, normalisation,
softmax, residual additions, embedding lookups, position embeddings) is not
counted; it is a few percent of the total at these sizes.

The count is per example (batch 1) over the static sequence: padding tokens are
counted like real ones. A `SparseMoE` layer counts its float32 router and
`top_k` experts per token (the compute a token actually gets, not all experts);
heterogeneous plugin experts count as `top_k` times their mean cost. Layers that
this module does not know are counted as `2 * parameters` FLOPs per token (one
multiply-add per weight and token), which is exact for token-wise MLPs.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

__all__ = ["count_parameters", "forward_flops", "model_profile"]


def _size(variables) -> int:
    return int(sum(math.prod(v.shape) for v in variables))


def _tokens(shape) -> int:
    """Positions per example of a `(batch, ..., features)` shape."""
    return int(math.prod(int(d) for d in shape[1:-1]))


def dense_flops(layer: keras.layers.Dense, input_shape) -> int:
    """`tokens * (2 * in * units + units)` for a `Dense` applied on the last axis."""
    in_dim, units = (int(d) for d in layer.kernel.shape)
    per_token = 2 * in_dim * units + (units if layer.use_bias else 0)
    return _tokens(input_shape) * per_token


def einsum_dense_flops(layer: keras.layers.EinsumDense, input_shape) -> int:
    """`EinsumDense` with a kernel `(in, *out)` on the last axis: 2 FLOPs per kernel entry and token."""
    kernel = math.prod(int(d) for d in layer.kernel.shape)
    bias = 0 if layer.bias is None else math.prod(int(d) for d in layer.bias.shape)
    return _tokens(input_shape) * (2 * kernel + bias)


def conv_flops(layer: keras.layers.Layer, input_shape) -> int:
    """Convolutions (1D/2D/3D, `channels_last`): per output position `2 * k * c_in / groups * c_out + c_out`."""
    output_shape = layer.compute_output_shape((1,) + tuple(input_shape[1:]))
    positions = int(math.prod(int(d) for d in output_shape[1:-1]))
    kernel = math.prod(int(d) for d in layer.kernel.shape)  # (*k, c_in / groups, c_out)
    out_channels = int(layer.kernel.shape[-1])
    bias = out_channels if layer.use_bias else 0
    return positions * (2 * kernel + bias)


def attention_flops(layer: keras.layers.MultiHeadAttention, query_shape, value_shape=None) -> int:
    """Q, K, V and output projections plus `QK^T` and the weighted sum of values."""
    value_shape = query_shape if value_shape is None else value_shape
    query_len, value_len = _tokens(query_shape), _tokens(value_shape)
    heads, key_dim = layer.num_heads, layer.key_dim
    value_dim = layer.value_dim or key_dim
    projections = (
        einsum_dense_flops(layer._query_dense, query_shape)
        + einsum_dense_flops(layer._key_dense, value_shape)
        + einsum_dense_flops(layer._value_dense, value_shape)
    )
    output = query_len * (
        2 * math.prod(int(d) for d in layer._output_dense.kernel.shape)
        + (0 if layer._output_dense.bias is None else int(np.prod(layer._output_dense.bias.shape)))
    )
    products = 2 * query_len * value_len * heads * (key_dim + value_dim)
    return projections + output + products


def _moe_flops(layer, input_shape) -> int:
    tokens = _tokens(input_shape)
    d_model = int(input_shape[-1])
    router = tokens * 2 * d_model * layer.num_experts
    if layer.bank.expert_layers:
        per_expert = np.mean([_layer_flops(e, (1, tokens, d_model)) for e in layer.bank.expert_layers])
        experts = int(round(layer.top_k * per_expert))
    else:
        # Built-in experts: stacked (E, d, h) and (E, h, d) kernels with biases.
        hidden = int(layer.bank.inner_kernel.shape[-1])
        per_token = 2 * d_model * hidden + hidden + 2 * hidden * d_model + d_model
        experts = tokens * layer.top_k * per_token
    shared = _layer_flops(layer.shared_ffn, input_shape) if getattr(layer, "shared_expert", False) else 0
    return router + experts + shared


def _functional_flops(model: keras.Model) -> int:
    total = 0
    for op in model.operations:
        if isinstance(op, keras.layers.InputLayer) or not isinstance(op, keras.layers.Layer):
            continue  # inputs and keras.ops calls (reshape, slicing, comparisons)
        node = op._inbound_nodes[0]
        shapes = [tuple(t.shape) for t in node.arguments.keras_tensors]
        if isinstance(op, keras.Model) and hasattr(op, "operations"):
            total += _functional_flops(op)
        else:
            total += _layer_flops(op, *shapes)
    return total


def _layer_flops(layer, input_shape, *other_shapes) -> int:
    from keras_hub.layers import TransformerEncoder

    from kvlm.layers import CNNEncoder, FusionBlock, ModalityFusion, TextEncoder, ViTEncoder
    from kvlm.layers.cnn_encoder import ResidualConvBlock
    from kvlm.layers.fusion import FeedForward
    from kvlm.layers.moe import SparseMoE
    from kvlm.layers.patch_embedding import PatchEmbedding

    layers = keras.layers
    if isinstance(layer, keras.Model) and hasattr(layer, "operations") and getattr(layer, "_inbound_nodes", None):
        return _functional_flops(layer)
    if isinstance(layer, layers.Dense):
        return dense_flops(layer, input_shape)
    if isinstance(layer, layers.EinsumDense):
        return einsum_dense_flops(layer, input_shape)
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        return conv_flops(layer, input_shape)
    if isinstance(layer, layers.MultiHeadAttention):
        return attention_flops(layer, input_shape, other_shapes[0] if other_shapes else None)
    if isinstance(layer, TransformerEncoder):
        hidden = (input_shape[0], input_shape[1], layer._feedforward_intermediate_dense.kernel.shape[-1])
        return (
            attention_flops(layer._self_attention_layer, input_shape)
            + dense_flops(layer._feedforward_intermediate_dense, input_shape)
            + dense_flops(layer._feedforward_output_dense, hidden)
        )
    if isinstance(layer, SparseMoE):
        return _moe_flops(layer, input_shape)
    if isinstance(layer, FeedForward):
        hidden = tuple(input_shape[:-1]) + (layer.intermediate_dim,)
        return dense_flops(layer.inner, input_shape) + dense_flops(layer.outer, hidden)
    if isinstance(layer, FusionBlock):
        return attention_flops(layer.attention, input_shape) + _layer_flops(layer.ffn, input_shape)
    if isinstance(layer, PatchEmbedding):
        return conv_flops(layer.projection, input_shape)
    if isinstance(layer, ViTEncoder):
        tokens = layer.patch_embedding.compute_output_shape(input_shape)
        return _layer_flops(layer.patch_embedding, input_shape) + sum(
            _layer_flops(block, tokens) for block in layer.transformer_layers
        )
    if isinstance(layer, TextEncoder):
        tokens = (input_shape[0], input_shape[1], layer.hidden_dim)
        return sum(_layer_flops(block, tokens) for block in layer.transformer_layers)
    if isinstance(layer, ResidualConvBlock):
        return conv_flops(layer.conv_1, input_shape) + conv_flops(layer.conv_2, input_shape)
    if isinstance(layer, CNNEncoder):
        total = conv_flops(layer.stem, input_shape)
        shape = layer.stem.compute_output_shape((1,) + tuple(input_shape[1:]))
        for block, down in zip(layer.blocks, layer.downsamples):
            total += _layer_flops(block, shape) + conv_flops(down, shape)
            shape = down.compute_output_shape(shape)
        return total + dense_flops(layer.projection, (1, layer.num_tokens, layer.filters))
    if isinstance(layer, ModalityFusion):
        return 0
    if not layer.weights or isinstance(
        layer, (layers.LayerNormalization, layers.BatchNormalization, layers.Embedding)
    ) or type(layer).__name__ in ("TokenAndPositionEmbedding", "PositionEmbedding"):
        return 0
    # Unknown layer with weights: one multiply-add per weight and token.
    return _tokens(input_shape) * 2 * _size(layer.weights)


def forward_flops(model: keras.layers.Layer, input_shape=None) -> int:
    """Analytic forward FLOPs of one example (see the module docstring for what counts).

    Args:
        model: A built functional model (e.g. `VLMClassifier`, `VLMBackbone`) or a
            built layer.
        input_shape: For a layer: its input shape with a leading batch axis, e.g.
            `(None, 32, 32, 3)`. Not needed for functional models.

    Returns:
        FLOPs (2 per multiply-add, 1 per bias addition) of a batch-1 forward pass.
    """
    if isinstance(model, keras.Model) and hasattr(model, "operations") and input_shape is None:
        return int(_functional_flops(model))
    if input_shape is None:
        raise ValueError(f"`input_shape` is needed for a {type(model).__name__} layer. Received: input_shape=None")
    return int(_layer_flops(model, tuple(input_shape)))


def _moe_layers(model: keras.layers.Layer) -> list:
    from kvlm.layers.moe import SparseMoE

    return [layer for layer in model._flatten_layers(include_self=True) if isinstance(layer, SparseMoE)]


def count_parameters(model: keras.layers.Layer) -> dict[str, int]:
    """Parameter counts of a built model.

    Returns a dict with `total` (every variable, as `model.count_params()`),
    `trainable`, and `active`: `total` less the parameters of the experts a
    token does not use in each `SparseMoE` layer (all but `top_k`; heterogeneous
    experts by their mean size). For a dense model `active == total`.
    """
    total = _size(model.weights)
    inactive = 0.0
    for moe in _moe_layers(model):
        if moe.bank.expert_layers:
            sizes = [_size(expert.weights) for expert in moe.bank.expert_layers]
        else:
            per_expert = _size(moe.bank.weights)
            sizes = [per_expert // moe.num_experts] * moe.num_experts
        inactive += (len(sizes) - min(moe.top_k, len(sizes))) * float(np.mean(sizes))
    return {
        "total": total,
        "trainable": _size(model.trainable_weights),
        "active": int(round(total - inactive)),
    }


def model_profile(model: keras.Model) -> dict[str, Any]:
    """`count_parameters(model)` plus `flops` (per-example forward FLOPs) and the number of MoE layers."""
    return {
        "parameters": count_parameters(model),
        "flops": forward_flops(model),
        "moe_layers": len(_moe_layers(model)),
    }
