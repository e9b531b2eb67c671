"""Moving tokens to expert slots and back, by token index (gather / scatter).

Shapes: `x` is `(tokens, d)`; a slot table is `(num_experts * capacity,)` of token
indices where `tokens` marks an empty slot (it points at an appended zero row).
"""

from __future__ import annotations

import keras
from keras import ops

from kvlm.layers.moe import router as routing_lib
from kvlm.layers.moe.router import _jit_on_jax


def _with_zero_row(x):
    return ops.concatenate([x, ops.zeros((1, x.shape[-1]), dtype=x.dtype)], axis=0)


@_jit_on_jax("num_experts", "capacity")
def dispatch(x, token_table, num_experts: int, capacity):
    """Gathers tokens into expert buffers `(num_experts, capacity, d)`; empty slots are zeros."""
    gathered = ops.take(_with_zero_row(x), token_table, axis=0)
    return ops.reshape(gathered, (num_experts, capacity, x.shape[-1]))


@_jit_on_jax()
def combine_by_assignment(expert_outputs, assignment_slot, assignment_gate):
    """Token-choice combine: each token gathers its k slot outputs, weighted by its gates.

    Args:
        expert_outputs: `(num_experts, capacity, d)`.
        assignment_slot: int `(tokens, k)`; `num_experts * capacity` means dropped.
        assignment_gate: `(tokens, k)` weights (0 where dropped).

    Returns:
        `(tokens, d)`.
    """
    d = expert_outputs.shape[-1]
    flat = _with_zero_row(ops.reshape(expert_outputs, (-1, d)))
    picked = ops.take(flat, assignment_slot, axis=0)  # (tokens, k, d)
    gate = ops.cast(assignment_gate, picked.dtype)
    return ops.sum(picked * gate[..., None], axis=1)


@_jit_on_jax("num_tokens")
def combine_by_slot(expert_outputs, token_table, slot_weights, num_tokens):
    """Scatter-add combine (any number of experts per token, e.g. expert choice).

    Args:
        expert_outputs: `(num_experts, capacity, d)`.
        token_table: int `(num_experts * capacity,)`; `num_tokens` marks empty slots.
        slot_weights: `(num_experts * capacity,)`.
        num_tokens: Number of tokens (int or scalar tensor).

    Returns:
        `(num_tokens, d)`.
    """
    d = expert_outputs.shape[-1]
    flat = ops.reshape(expert_outputs, (-1, d))
    weighted = flat * ops.cast(slot_weights, flat.dtype)[:, None]
    summed = ops.segment_sum(weighted, token_table, num_segments=num_tokens + 1)
    return ops.cast(summed[:num_tokens], expert_outputs.dtype)


@_jit_on_jax("activation")
def batched_ffn(expert_inputs, inner_kernel, inner_bias, outer_kernel, outer_bias, activation: str = "gelu"):
    """All built-in experts at once: `(E, capacity, d)` through stacked `(E, d, h)` / `(E, h, d)` weights."""
    hidden = ops.matmul(expert_inputs, inner_kernel) + inner_bias[:, None, :]
    hidden = keras.activations.get(activation)(hidden)
    return ops.matmul(hidden, outer_kernel) + outer_bias[:, None, :]


@_jit_on_jax("num_experts", "capacity", "activation")
def builtin_experts_forward(x, routing, weights, *, num_experts: int, capacity, activation: str = "gelu"):
    """Dispatch, built-in batched FFN experts and combine in one step: `(tokens, d)` -> `(tokens, d)`.

    Args:
        x: `(tokens, d)`.
        routing: A `kvlm.layers.moe.router.Routing`.
        weights: `(inner_kernel, inner_bias, outer_kernel, outer_bias)`.
    """
    expert_inputs = dispatch(x, routing.token_table, num_experts, capacity)
    expert_outputs = batched_ffn(expert_inputs, *weights, activation=activation)
    return combine(expert_outputs, routing, routing_lib.num_tokens_of(x))


def combine(expert_outputs, routing, num_tokens):
    """Combines with `combine_by_assignment` for token choice, else `combine_by_slot`."""
    if routing.assignment_slot is not None:
        return combine_by_assignment(expert_outputs, routing.assignment_slot, routing.assignment_gate)
    return combine_by_slot(expert_outputs, routing.token_table, routing.slot_weights, num_tokens)
