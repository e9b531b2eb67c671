"""Routing for the sparse MoE layer: who goes where, and the auxiliary losses.

Everything here is a pure function of float32 router logits / probabilities over
flattened tokens `(tokens, num_experts)` and a boolean padding mask `(tokens,)`,
written with `keras.ops` only so it runs on every backend and inside
`tf.function` / `jax.jit`.

Routing results are expressed as *slot tables*: every expert has `capacity`
slots, slot `e * capacity + c` holds one token index (or `tokens`, the index of a
zero "dummy" row, when empty). Dispatch gathers tokens by that table and
combine gathers (token choice) or scatter-adds (expert choice) the expert
outputs back, so the cost of moving tokens grows with `top_k * capacity` and
never with a dense `(tokens, experts, capacity)` one-hot tensor.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, NamedTuple

import keras
from keras import ops

from kvlm.layers.ops import top_k as exportable_top_k

IMAGE_MODALITY = 0
TEXT_MODALITY = 1
ENTROPY_KEYS = ("image_local", "image_global", "text_local", "text_global")
_EPS = 1e-9


class Routing(NamedTuple):
    """Result of routing `tokens` tokens to `num_experts * capacity` slots.

    Attributes:
        token_table: int32 `(num_experts * capacity,)`, the token held by each
            slot, `tokens` for an empty slot.
        slot_weights: float32 `(num_experts * capacity,)`, combine weight of each
            slot (0 for empty slots).
        assignment_slot: int32 `(tokens, top_k)`, slot of each token's k-th
            choice, `num_experts * capacity` when dropped or padding (token
            choice only, else None).
        assignment_gate: float32 `(tokens, top_k)` combine weight of each choice,
            0 when dropped or padding (token choice only, else None).
        expert_index: int32 `(tokens, top_k)` chosen experts before capacity
            (token choice only, else None).
    """

    token_table: Any
    slot_weights: Any
    assignment_slot: Any = None
    assignment_gate: Any = None
    expert_index: Any = None


def _jit_on_jax(*static_argnames: str):
    """Compiles a pure routing function as one XLA program on JAX.

    Eager JAX dispatches (and compiles) every small op separately; one program
    per function keeps eager calls fast. Inside an outer `jit` it is inlined.
    """

    def wrap(fn):
        if keras.backend.backend() != "jax":
            return fn
        import jax

        return jax.jit(fn, static_argnames=static_argnames)

    return wrap


def num_tokens_of(x):
    """Number of rows of `x`: a Python int when static, a JAX symbolic dimension where JAX traces
    an unknown batch (Keras's symbolic build, jax2tf export), else a scalar int32 tensor."""
    n = x.shape[0]
    return n if n is not None else ops.shape(x)[0]


def compute_capacity(num_tokens, num_experts: int, top_k: int, capacity_factor: float | None):
    """Slots per expert: `ceil(capacity_factor * top_k * tokens / num_experts)`, at least 1, at most `tokens`.

    `capacity_factor=None` means no token is ever dropped (capacity = tokens). A static token
    count (a Python int, or a JAX symbolic dimension, which is at least 1) gives a static
    capacity computed in exact integer arithmetic, so `jax.jit` can take it as a static argument
    and shapes can use it; a tensor count (TensorFlow's unknown batch) gives an int32 tensor.
    """
    if ops.is_tensor(num_tokens):
        if capacity_factor is None:
            return ops.maximum(num_tokens, 1)
        capacity = ops.cast(
            ops.ceil(ops.cast(num_tokens, "float32") * (capacity_factor * top_k / num_experts) - 1e-6), "int32"
        )
        return ops.minimum(ops.maximum(capacity, 1), ops.maximum(num_tokens, 1))
    symbolic = not isinstance(num_tokens, int)
    ratio = None if capacity_factor is None else Fraction(capacity_factor).limit_denominator(10**6) * top_k / num_experts
    if ratio is None or ratio >= 1:
        return num_tokens if symbolic else max(num_tokens, 1)
    capacity = (num_tokens * ratio.numerator + ratio.denominator - 1) // ratio.denominator
    return capacity if symbolic else max(capacity, 1)


def _arange(n):
    return ops.arange(n, dtype="int32") if isinstance(n, int) else ops.cast(ops.arange(n), "int32")


@_jit_on_jax("top_k", "capacity", "batch_prioritized", "normalize_gates")
def tokens_choose_routing(
    probs,
    mask,
    top_k: int,
    capacity,
    batch_prioritized: bool = True,
    normalize_gates: bool = False,
) -> Routing:
    """Top-k token choice (k=1 Switch, k=2 GShard) with capacity and optional BPR.

    Each real token picks its `top_k` experts. Assignments are served slot-major
    (every token's first choice before any second choice); within a choice level
    tokens are served by descending top-1 router probability when
    `batch_prioritized` (V-MoE BPR), else by position. An expert keeps its first
    `capacity` assignments; later ones are dropped. Padding tokens take no slot.

    Args:
        probs: float32 `(tokens, num_experts)` router probabilities.
        mask: bool `(tokens,)`, False for padding.
        top_k: Experts per token.
        capacity: Slots per expert (int or scalar tensor).
        batch_prioritized: Serve high-probability tokens first.
        normalize_gates: Renormalize the top-k probabilities to sum to 1 (with `top_k=1`
            every gate is 1: the chosen expert's output passes unscaled).
    """
    probs, mask = ops.convert_to_tensor(probs, "float32"), ops.convert_to_tensor(mask, "bool")
    num_tokens = num_tokens_of(probs)
    num_experts = probs.shape[-1]
    num_slots = num_experts * capacity
    gates, expert_index = exportable_top_k(probs, top_k)
    top1 = ops.stop_gradient(gates[:, 0])
    if normalize_gates:
        gates = gates / ops.maximum(ops.sum(gates, axis=-1, keepdims=True), _EPS)
    maskf = ops.cast(mask, "float32")
    gates = gates * maskf[:, None]

    positions = _arange(num_tokens)
    if batch_prioritized:
        priority = ops.where(mask, top1, -1.0)
        order = ops.cast(ops.argsort(-priority), "int32")
        # rank[t] = place of token t in the priority order (inverse permutation).
        rank = ops.scatter_update(ops.zeros_like(positions), order[:, None], positions)
    else:
        rank = positions

    # Assignment a = j * tokens + t (slot-major); padding goes to bucket `num_experts`.
    bucket = ops.where(mask[:, None], expert_index, num_experts)
    # Slot-major by slicing, not by an int32 transpose (TensorFlow's oneDNN build logs an error
    # line for int32 transposes on CPUs without AVX-512).
    bucket = ops.concatenate([bucket[:, j] for j in range(top_k)], axis=0)
    level = ops.arange(top_k, dtype="int32")[:, None] * num_tokens
    priority_key = ops.reshape(level + rank[None, :], (-1,))
    num_assignments = top_k * num_tokens
    sort_key = bucket * num_assignments + priority_key
    perm = ops.cast(ops.argsort(sort_key), "int32")
    bucket_sorted = ops.take(bucket, perm)
    counts = ops.cast(ops.segment_sum(ops.ones_like(bucket), bucket, num_segments=num_experts + 1), "int32")
    starts = ops.cumsum(counts) - counts
    position_in_expert = _arange(num_assignments) - ops.take(starts, bucket_sorted)
    kept_sorted = ops.logical_and(position_in_expert < capacity, bucket_sorted < num_experts)
    slot_sorted = ops.where(kept_sorted, bucket_sorted * capacity + position_in_expert, num_slots)

    assignment_slot = ops.scatter_update(ops.zeros_like(perm), perm[:, None], slot_sorted)
    assignment_slot = ops.stack([assignment_slot[j * num_tokens:(j + 1) * num_tokens] for j in range(top_k)], axis=1)
    kept = assignment_slot < num_slots
    assignment_gate = gates * ops.cast(kept, "float32")

    token_sorted = perm % num_tokens
    token_table = ops.scatter_update(
        ops.full((num_slots + 1,), num_tokens, dtype="int32"), slot_sorted[:, None], token_sorted
    )[:num_slots]
    flat_gates = ops.concatenate([ops.reshape(ops.transpose(assignment_gate), (-1,)), ops.zeros((1,))], 0)
    assignment_table = ops.scatter_update(
        ops.full((num_slots + 1,), num_assignments, dtype="int32"), slot_sorted[:, None], perm
    )[:num_slots]
    slot_weights = ops.take(flat_gates, assignment_table)
    return Routing(token_table, slot_weights, assignment_slot, assignment_gate, expert_index)


@_jit_on_jax("capacity")
def experts_choose_routing(probs, mask, capacity) -> Routing:
    """Expert choice routing (Zhou et al. 2022): each expert takes its top-`capacity` tokens.

    A token may be processed by several experts or by none. The combine weight
    is the token's router probability for that expert (as in tf-models'
    `ExpertsChooseMaskedRouter`). Padding tokens are never chosen.

    Args:
        probs: float32 `(tokens, num_experts)` router probabilities.
        mask: bool `(tokens,)`, False for padding.
        capacity: Tokens per expert (int or scalar tensor).
    """
    probs, mask = ops.convert_to_tensor(probs, "float32"), ops.convert_to_tensor(mask, "bool")
    num_tokens = num_tokens_of(probs)
    scores = ops.where(mask[:, None], probs, -1.0)
    values, token_index = exportable_top_k(ops.transpose(scores), capacity)  # (experts, capacity)
    valid = values >= 0.0
    token_table = ops.where(valid, ops.cast(token_index, "int32"), num_tokens)
    slot_weights = ops.where(valid, values, 0.0)
    return Routing(ops.reshape(token_table, (-1,)), ops.reshape(slot_weights, (-1,)))


@_jit_on_jax()
def router_z_loss(logits, mask):
    """Mean over real tokens of `logsumexp(logits)^2` (ST-MoE)."""
    logits = ops.convert_to_tensor(logits, "float32")
    maskf = ops.cast(mask, "float32")
    z = ops.logsumexp(logits, axis=-1)
    return ops.sum(maskf * ops.square(z)) / ops.maximum(ops.sum(maskf), 1.0)


@_jit_on_jax()
def load_balancing_loss(probs, expert_index, mask):
    """Switch load-balancing loss `E * sum_e f_e * P_e` over real tokens.

    `f_e` is the fraction of (token, choice) assignments sent to expert e before
    capacity; `P_e` is the mean router probability of expert e. Equals 1 for a
    perfectly uniform router.
    """
    probs = ops.convert_to_tensor(probs, "float32")
    num_experts = probs.shape[-1]
    maskf = ops.cast(mask, "float32")
    num_real = ops.maximum(ops.sum(maskf), 1.0)
    chosen = ops.sum(ops.one_hot(expert_index, num_experts, dtype="float32"), axis=1)  # (tokens, E)
    fraction = ops.sum(chosen * maskf[:, None], axis=0) / (num_real * expert_index.shape[-1])
    mean_prob = ops.sum(probs * maskf[:, None], axis=0) / num_real
    return num_experts * ops.sum(ops.stop_gradient(fraction) * mean_prob)


def token_entropy(logits):
    """Entropy of each token's routing distribution, `(tokens,)`."""
    log_probs = ops.log_softmax(logits, axis=-1)
    return -ops.sum(ops.exp(log_probs) * log_probs, axis=-1)


@_jit_on_jax()
def mean_entropy(logits, mask):
    """Mean per-token routing entropy over real tokens."""
    logits = ops.convert_to_tensor(logits, "float32")
    maskf = ops.cast(mask, "float32")
    return ops.sum(token_entropy(logits) * maskf) / ops.maximum(ops.sum(maskf), 1.0)


@_jit_on_jax()
def entropy_losses(logits, mask, modality=None) -> dict:
    """LIMoE entropy losses per modality, unweighted.

    For image tokens and text tokens separately: `*_local` is the mean entropy of
    the per-token routing distributions (minimizing it makes routing
    confident); `*_global` is the negative entropy of the mean routing
    distribution (minimizing it spreads the modality over experts). Padding and
    [CLS] tokens never count. Without `modality`, all real tokens count as text.

    Returns:
        Dict with keys `image_local`, `image_global`, `text_local`, `text_global`.
    """
    logits = ops.convert_to_tensor(logits, "float32")
    mask = ops.convert_to_tensor(mask, "bool")
    probs = ops.softmax(logits, axis=-1)
    entropies = token_entropy(logits)
    losses = {}
    for name, modality_id in (("image", IMAGE_MODALITY), ("text", TEXT_MODALITY)):
        if modality is None:
            selected = mask if name == "text" else ops.zeros_like(mask)
        else:
            selected = ops.logical_and(mask, ops.equal(modality, modality_id))
        selectedf = ops.cast(selected, "float32")
        count = ops.maximum(ops.sum(selectedf), 1.0)
        losses[f"{name}_local"] = ops.sum(entropies * selectedf) / count
        mean_probs = ops.sum(probs * selectedf[:, None], axis=0) / count
        losses[f"{name}_global"] = ops.sum(mean_probs * ops.log(mean_probs + _EPS))
    return losses


@_jit_on_jax("capacity")
def routing_statistics(logits, token_table, assignment_slot, mask, capacity):
    """Statistics of one routing: per-expert load, dropped-token fraction, mean entropy.

    Args:
        logits: float32 `(tokens, experts)` logits used for routing.
        token_table: Slot table of the routing.
        assignment_slot: `(tokens, k)` slots (token choice) or None (expert choice).
        mask: bool `(tokens,)`.
        capacity: Slots per expert.

    Returns:
        `(expert_load, dropped_token_fraction, router_entropy)`: load is the
        fraction of routed assignments per expert (sums to 1 when any token is
        routed); dropped tokens are real tokens processed by no expert.
    """
    logits = ops.convert_to_tensor(logits, "float32")
    mask = ops.convert_to_tensor(mask, "bool")
    num_tokens = num_tokens_of(logits)
    num_experts = logits.shape[-1]
    used = ops.cast(token_table < num_tokens, "float32")
    per_expert = ops.sum(ops.reshape(used, (num_experts, -1)), axis=1)
    if assignment_slot is not None:
        routed = ops.any(assignment_slot < num_experts * capacity, axis=-1)
    else:
        hits = ops.segment_sum(used, token_table, num_segments=num_tokens + 1)
        routed = hits[:num_tokens] > 0
    maskf = ops.cast(mask, "float32")
    num_real = ops.maximum(ops.sum(maskf), 1.0)
    load = per_expert / ops.maximum(ops.sum(per_expert), 1.0)
    dropped = 1.0 - ops.sum(ops.cast(routed, "float32") * maskf) / num_real
    return load, dropped, mean_entropy(logits, mask)


@_jit_on_jax(
    "router", "top_k", "capacity", "batch_prioritized", "normalize_gates",
    "load_balance_weight", "z_loss_weight", "entropy_weights",
)
def route(
    x,
    mask,
    modality,
    router_kernel,
    noise=None,
    *,
    router: str = "tokens_choose",
    top_k: int = 2,
    capacity=1,
    batch_prioritized: bool = True,
    normalize_gates: bool = False,
    load_balance_weight: float = 0.0,
    z_loss_weight: float = 0.0,
    entropy_weights: tuple = (),
):
    """Router of the MoE layer: float32 logits, routing, weighted aux losses and statistics.

    Args:
        x: `(tokens, d)` flat tokens.
        mask: bool `(tokens,)`, False for padding.
        modality: int `(tokens,)` modality ids or None.
        router_kernel: float32 `(d, experts)`.
        noise: Optional `(tokens, experts)` added to the logits (noisy gating).
        router: `"tokens_choose"` or `"experts_choose"`.
        top_k, capacity, batch_prioritized, normalize_gates: See `tokens_choose_routing`.
        load_balance_weight, z_loss_weight: Loss weights (0 = not computed).
        entropy_weights: `((key, weight), ...)` LIMoE entropy weights > 0.

    Returns:
        `(routing, losses, statistics)`: `losses` is a dict name -> weighted
        scalar for every active loss; `statistics` as in `routing_statistics`.
    """
    mask = ops.convert_to_tensor(mask, "bool")
    logits = ops.matmul(ops.cast(x, "float32"), ops.cast(router_kernel, "float32"))
    used_logits = logits if noise is None else logits + ops.cast(noise, "float32")
    probs = ops.softmax(used_logits, axis=-1)
    if router == "tokens_choose":
        routing = tokens_choose_routing(probs, mask, top_k, capacity, batch_prioritized, normalize_gates)
    else:
        routing = experts_choose_routing(probs, mask, capacity)
    losses = {}
    if load_balance_weight > 0 and router == "tokens_choose":
        losses["load_balance"] = load_balance_weight * load_balancing_loss(probs, routing.expert_index, mask)
    if z_loss_weight > 0:
        losses["z_loss"] = z_loss_weight * router_z_loss(logits, mask)
    if entropy_weights:
        terms = entropy_losses(used_logits, mask, modality)
        losses["entropy"] = sum(weight * terms[key] for key, weight in entropy_weights)
    statistics = routing_statistics(
        ops.stop_gradient(used_logits), routing.token_table, routing.assignment_slot, mask, capacity
    )
    return routing, losses, tuple(ops.stop_gradient(v) for v in statistics)
