"""Routing functions of kvlm.layers.moe.router against hand-made and greedy references."""

import numpy as np
import pytest
from moe_reference import softmax as _softmax
from moe_reference import to_numpy as _np

from kvlm.layers.moe import router as R


def _greedy(probs, mask, k, capacity, bpr):
    """Loop reference: slot-major, BPR (top-1 prob) or position order, first come first served."""
    num_tokens, num_experts = probs.shape
    index = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    real = [t for t in range(num_tokens) if mask[t]]
    order = sorted(real, key=lambda t: -probs[t].max()) if bpr else real
    fill = np.zeros(num_experts, int)
    slots = {}
    for j in range(k):
        for t in order:
            e = index[t, j]
            if fill[e] < capacity:
                slots[(t, j)] = e * capacity + fill[e]
                fill[e] += 1
    return index, slots


def test_capacity_formula():
    assert R.compute_capacity(10, 4, 2, 1.25) == 7  # ceil(6.25)
    assert R.compute_capacity(64, 8, 1, 1.0) == 8
    assert R.compute_capacity(10, 2, 2, 4.0) == 10  # at most the number of tokens
    assert R.compute_capacity(10, 4, 2, None) == 10
    assert R.compute_capacity(3, 64, 1, 1.0) == 1


@pytest.mark.parametrize(
    "k,bpr,normalize", [(1, True, False), (1, False, False), (2, True, False), (2, False, False), (2, True, True)]
)
def test_tokens_choose_matches_greedy_reference(k, bpr, normalize):
    rng = np.random.default_rng(k + 2 * bpr)
    num_tokens, num_experts, capacity = 24, 4, 5  # 24*k assignments into 20 slots: overflow
    probs = _softmax(rng.normal(size=(num_tokens, num_experts)) * 2).astype("float32")
    mask = rng.random(num_tokens) > 0.2
    routing = R.tokens_choose_routing(probs, mask, k, capacity, batch_prioritized=bpr, normalize_gates=normalize)
    index, slots = _greedy(probs, mask, k, capacity, bpr)
    num_slots = num_experts * capacity
    assignment_slot = _np(routing.assignment_slot)
    token_table = _np(routing.token_table)
    np.testing.assert_array_equal(_np(routing.expert_index), index)
    expected_table = np.full(num_slots, num_tokens)
    expected_slot = np.full((num_tokens, k), num_slots)
    for (t, j), s in slots.items():
        expected_table[s] = t
        expected_slot[t, j] = s
    np.testing.assert_array_equal(assignment_slot, expected_slot)
    np.testing.assert_array_equal(token_table, expected_table)
    gates = np.take_along_axis(probs, index, 1)
    if normalize:  # the priority stays the raw top-1 probability
        gates = gates / gates.sum(-1, keepdims=True)
    np.testing.assert_allclose(_np(routing.assignment_gate), gates * (expected_slot < num_slots), atol=1e-6)
    weights = np.zeros(num_slots, "float32")
    for (t, j), s in slots.items():
        weights[s] = gates[t, j]
    np.testing.assert_allclose(_np(routing.slot_weights), weights, atol=1e-6)
    assert len(slots) < mask.sum() * k  # something was dropped


def test_second_choices_wait_for_all_first_choices():
    # token 0 has the highest priority, but its *second* choice (expert 1) must
    # queue behind the *first* choices of tokens 1 and 2 (slot-major order).
    probs = np.array([[0.5, 0.3, 0.2], [0.35, 0.45, 0.2], [0.2, 0.4, 0.4 - 1e-3]], "float32")
    routing = R.tokens_choose_routing(probs, np.ones(3, bool), 2, 1)
    slots = _np(routing.assignment_slot)  # 3 experts * capacity 1
    assert slots[1, 0] == 1  # token 1 (0.45) wins expert 1 over token 2 (0.4)
    assert slots[2, 0] == 3 and slots[0, 1] == 3  # token 2 and token 0's second choice dropped
    assert slots[0, 0] == 0 and slots[2, 1] == 2 and slots[1, 1] == 3


def test_padding_never_takes_a_slot():
    probs = np.array([[0.99, 0.01], [0.6, 0.4], [0.7, 0.3]], "float32")
    mask = np.array([False, True, True])
    for fn in (
        lambda: R.tokens_choose_routing(probs, mask, 1, 1),
        lambda: R.experts_choose_routing(probs, mask, 1),
    ):
        table = _np(fn().token_table)
        assert 0 not in table
    assert list(_np(R.tokens_choose_routing(probs, mask, 1, 1).token_table)) == [2, 3]


def test_normalize_gates():
    probs = np.array([[0.5, 0.3, 0.2]], "float32")
    routing = R.tokens_choose_routing(probs, np.ones(1, bool), 2, 1, normalize_gates=True)
    np.testing.assert_allclose(_np(routing.assignment_gate), [[0.625, 0.375]], atol=1e-6)


def test_experts_choose_picks_top_capacity_real_tokens():
    rng = np.random.default_rng(7)
    probs = _softmax(rng.normal(size=(12, 3))).astype("float32")
    mask = np.ones(12, bool)
    mask[[2, 5]] = False
    routing = R.experts_choose_routing(probs, mask, 4)
    table = _np(routing.token_table).reshape(3, 4)
    weights = _np(routing.slot_weights).reshape(3, 4)
    for e in range(3):
        scores = np.where(mask, probs[:, e], -1)
        assert set(table[e]) == set(np.argsort(-scores)[:4])
        np.testing.assert_allclose(weights[e], probs[table[e], e], atol=1e-7)


def test_losses_by_hand():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -5.0]], "float32")
    mask = np.array([True, True, True, False])
    # z-loss: mean over the 3 real tokens of logsumexp^2.
    lse = [np.log(np.exp(2) + 1), np.log(1 + np.e), np.log(2 * np.e)]
    z = np.mean(np.square(lse))
    np.testing.assert_allclose(_np(R.router_z_loss(logits, mask)), z, rtol=1e-5)
    # Switch loss with k=1: top-1 experts are 0, 1, 0 (tie -> first) => f = (2/3, 1/3).
    probs = _softmax(logits)
    index = np.array([[0], [1], [0], [0]], "int32")
    p_mean = probs[:3].mean(0)
    expected = 2 * (2 / 3 * p_mean[0] + 1 / 3 * p_mean[1])
    np.testing.assert_allclose(_np(R.load_balancing_loss(probs, index, mask)), expected, rtol=1e-5)
    # Entropy: token 0, 2 image; token 1 text; token 3 padding.
    modality = np.array([0, 1, 0, 1], "int32")
    h = -(probs * np.log(probs)).sum(-1)
    losses = {k: float(_np(v)) for k, v in R.entropy_losses(logits, mask, modality).items()}
    image_mean = probs[[0, 2]].mean(0)
    np.testing.assert_allclose(losses["image_local"], (h[0] + h[2]) / 2, rtol=1e-5)
    np.testing.assert_allclose(losses["image_global"], (image_mean * np.log(image_mean)).sum(), rtol=1e-5)
    np.testing.assert_allclose(losses["text_local"], h[1], rtol=1e-5)
    np.testing.assert_allclose(losses["text_global"], -h[1], rtol=1e-5)


@pytest.mark.tensorflow_only
def test_experts_choose_parity_with_tf_models():
    import tensorflow as tf

    from official.nlp.modeling.layers import moe as tfm_moe

    rng = np.random.default_rng(3)
    num_tokens, num_experts, capacity = 32, 4, 10
    logits = rng.normal(size=(num_tokens, num_experts)).astype("float32") * 2
    reference = tfm_moe.ExpertsChooseMaskedRouter(
        num_experts, use_bias=False, router_z_loss_weight=1.0, export_metrics=False,
        kernel_initializer="identity",
    )
    mask_out = reference(tf.constant(logits[None]), expert_capacity=capacity, training=False)
    combine = mask_out.combine_array.numpy()[0].sum(-1)  # (tokens, experts); slot order is unspecified
    dispatched = mask_out.dispatch_mask.numpy()[0].sum(-1)

    routing = R.experts_choose_routing(_softmax(logits), np.ones(num_tokens, bool), capacity)
    table = _np(routing.token_table).reshape(num_experts, capacity)
    weights = _np(routing.slot_weights).reshape(num_experts, capacity)
    ours_combine = np.zeros((num_tokens, num_experts), "float32")
    ours_dispatch = np.zeros((num_tokens, num_experts), "float32")
    for e in range(num_experts):
        ours_combine[table[e], e] = weights[e]
        ours_dispatch[table[e], e] = 1
    np.testing.assert_array_equal(ours_dispatch, dispatched)
    np.testing.assert_allclose(ours_combine, combine, atol=1e-6)
    np.testing.assert_allclose(
        _np(R.router_z_loss(logits, np.ones(num_tokens, bool))), reference.losses[0].numpy(), rtol=1e-5
    )
