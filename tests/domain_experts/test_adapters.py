"""Per-example low-rank adapters against Keras's own LoRA, and keras-hub's `.lora.h5` layout."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kvlm.domain_experts.adapters import (
    adaptable_indices,
    batched_equation,
    enable_adapters,
    load_adapters,
    lora_pair,
    per_example_delta,
    pre_activation,
    save_adapters,
    weighted_layers,
)
from kvlm.models.backbone import VLMBackbone

RNG = np.random.default_rng(0)
CASES = {
    "dense_sequence": (lambda: keras.layers.Dense(6, activation="gelu"), (3, 5, 8)),
    "dense_vector": (lambda: keras.layers.Dense(6), (3, 8)),
    "einsum_query": (lambda: keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 4, 3), bias_axes="de"),
                     (3, 5, 8)),
    "einsum_output": (lambda: keras.layers.EinsumDense("abcd,cde->abe", output_shape=(None, 5), bias_axes="e"),
                      (3, 4, 3, 8)),
    "conv_same": (lambda: keras.layers.Conv2D(5, 3, padding="same", activation="relu"), (3, 9, 9, 3)),
    "conv_strided": (lambda: keras.layers.Conv2D(5, 3, strides=2, padding="same"), (3, 9, 9, 3)),
    "conv_patches": (lambda: keras.layers.Conv2D(5, 4, strides=4), (3, 8, 8, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_example_gets_exactly_its_own_experts_lora(case):
    """Examples routed to two experts and to none each equal Keras's `enable_lora` layer holding that pair."""
    make, shape = CASES[case]
    x = RNG.normal(size=shape).astype("float32")
    layer = make()
    layer.build(shape)
    layer.enable_lora(3)
    pairs = [(RNG.normal(size=layer.lora_kernel_a.shape), RNG.normal(size=layer.lora_kernel_b.shape)) for _ in range(2)]
    expected = []
    for a, b in pairs + [(np.zeros(layer.lora_kernel_a.shape), np.zeros(layer.lora_kernel_b.shape))]:
        layer.lora_kernel_a.assign(a)
        layer.lora_kernel_b.assign(b)
        expected.append(keras.ops.convert_to_numpy(layer(x)))
    zero = (np.zeros_like(pairs[0][0]), np.zeros_like(pairs[0][1]))
    a, b = (np.stack([p[i] for p in (pairs[0], pairs[1], zero)]).astype("float32") for i in (0, 1))
    delta = per_example_delta(layer, keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(a),
                              keras.ops.convert_to_tensor(b))
    got = keras.ops.convert_to_numpy(layer.activation(pre_activation(layer, x) + delta))
    for i in range(3):
        np.testing.assert_allclose(got[i], expected[i][i], rtol=1e-4, atol=1e-4)
    assert np.abs(expected[0][0] - expected[2][0]).max() > 0.1  # the adapters change the output


@pytest.mark.backend_independent
def test_einsum_equations_gain_a_batch_axis_or_are_refused_by_name():
    assert batched_equation("abc,cde->abde") == "abc,acdz->abdz"
    assert batched_equation("abcd,cde->abe") == "abcd,acdz->abz"
    for equation in ("ab,bc->ac b", "abc,acd->abd", "abc,dc->abd", "...b,bc->...c"):
        with pytest.raises(ValueError, match=f"Received: equation={equation!r}"):
            batched_equation(equation)


@pytest.fixture(scope="module")
def backbone():
    return VLMBackbone(vocabulary_size=20, encoder="cnn", num_fusion_layers=2)


def test_adapters_go_where_the_author_targets_and_only_they_train(backbone):
    layers = weighted_layers(backbone)
    everything = adaptable_indices(backbone)
    assert {type(layers[i]).__name__ for i in everything} == {"Conv2D", "Dense", "EinsumDense"}
    attention = adaptable_indices(backbone, ["attention"])
    assert attention and set(attention) < set(everything)
    assert all("attention" in layers[i].path for i in attention)
    with pytest.raises(ValueError, match=r"No Dense, EinsumDense or Conv2D layer .* targets=\['decoder'\]"):
        adaptable_indices(backbone, ["decoder"])
    copy = VLMBackbone.from_config(backbone.get_config())
    enable_adapters(copy, 4, attention)
    trainable = {v.path for v in copy.trainable_weights}
    assert len(trainable) == 2 * len(attention) and all("lora_kernel" in p for p in trainable)
    with pytest.raises(ValueError, match="`rank` must be an int >= 1. Received: rank=0"):
        enable_adapters(copy, 0, attention)


def test_adapters_are_saved_in_keras_hubs_lora_layout(tmp_path):
    """A keras-hub backbone's own `save_lora_weights` file reads back as adapters, and ours round-trips."""
    import keras_hub

    bert = keras_hub.models.BertBackbone(vocabulary_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                         intermediate_dim=16, max_sequence_length=8)
    bert.enable_lora(2)
    for variable in bert.trainable_weights:
        variable.assign(RNG.normal(size=variable.shape))
    bert.save_lora_weights(tmp_path / "bert.lora.h5")
    adapters = load_adapters(tmp_path / "bert.lora.h5")
    layers = weighted_layers(bert)
    lora = {i for i, layer in enumerate(layers) if getattr(layer, "lora_enabled", False)}
    assert set(adapters) == lora and len(lora) == 2  # query and value
    for index, (a, b) in adapters.items():
        own_a, own_b = lora_pair(layers[index])
        np.testing.assert_allclose(a, own_a, rtol=1e-6)
        np.testing.assert_allclose(b, own_b, rtol=1e-6)
    save_adapters(adapters, tmp_path / "again.lora.h5")
    again = load_adapters(tmp_path / "again.lora.h5")
    assert all(np.array_equal(again[i][j], adapters[i][j]) for i in adapters for j in (0, 1))
    with pytest.raises(ValueError, match="must end in `.lora.h5`"):
        save_adapters(adapters, tmp_path / "adapters.h5")


def test_routing_takes_the_best_admitting_expert_and_abstains_to_the_base():
    """Three experts' Gaussian keys around three directions (log-likelihoods near 8 at their centres)."""
    from kvlm.domain_experts.multi_adapter import route
    from kvlm.layers.moe.keys import gaussian_key

    keys = np.stack([gaussian_key(c + 0.05 * RNG.normal(size=(200, 3))) for c in np.eye(3)])
    features = keras.ops.convert_to_tensor(
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.98, 0.2, 0], [-1, 0, 0]], "float32"))

    def slots(thresholds, allowed=None):
        return keras.ops.convert_to_numpy(route(features, keys, np.array(thresholds, "float32"), allowed)[0]).tolist()

    # Expert 2's threshold is above what its own centre reaches; the opposite direction fits no key.
    assert slots([-50.0, -50.0, 20.0]) == [1, 2, 0, 1, 0]
    # Admitted by every key (a threshold no input misses), each goes to its most likely expert.
    assert slots([-1e4, -1e4, -1e4]) == [1, 2, 3, 1, 3]
    # Admitted by none: all to the base.
    assert slots([20.0, 20.0, 20.0]) == [0, 0, 0, 0, 0]
    # Experts an example may not use never take it: the next admitting one does, else the base.
    allowed = np.array([[False, True, False], [True, True, True], [False, False, False], [True, False, True],
                        [False, False, True]])
    assert slots([-1e4, -1e4, -1e4], allowed) == [2, 2, 0, 1, 3]
    assert slots([-50.0, -50.0, 20.0], allowed) == [0, 2, 0, 1, 0]


def test_routing_weight_is_the_posterior_among_the_admitting_experts():
    """Two mirror-image keys: a feature half-way between them weighs 0.5 for the one it goes to, one
    at a key's centre nearly 1, and an example left to the base 1."""
    from kvlm.domain_experts.multi_adapter import route
    from kvlm.layers.moe.keys import gaussian_key

    samples = np.array([1.0, 0.0, 0.0]) + 0.3 * RNG.normal(size=(400, 3))
    keys = np.stack([gaussian_key(samples), gaussian_key(samples[:, [1, 0, 2]])])
    features = keras.ops.convert_to_tensor(np.array([[0.7071, 0.7071, 0], [1, 0, 0], [0, 0, -1]], "float32"))
    slots, weights = (keras.ops.convert_to_numpy(x) for x in route(features, keys, np.array([-2.0, -2.0], "float32")))
    assert slots[2] == 0 and weights[2] == 1.0
    np.testing.assert_allclose(weights[0], 0.5, atol=1e-3)
    assert slots[1] == 1 and weights[1] > 0.99


def test_abstention_threshold_lets_its_quantile_of_unseen_inputs_fall_to_the_base():
    """Fitted on 300 unit-norm features in 32 dimensions, the threshold turns away about 1% of fresh
    draws of the same distribution; the 1% quantile of the key's own examples turns away five times more."""
    from kvlm.domain_experts.routing import abstention_threshold
    from kvlm.layers.moe.keys import gaussian_key, key_logits

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(32, 32)) / np.sqrt(32)

    def draw(n):
        x = rng.normal(size=(n, 32)) @ mixing + 1.0
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")

    own, held_out, fresh = draw(300), draw(75), draw(20_000)
    key = gaussian_key(own)

    def logits(x):
        return keras.ops.convert_to_numpy(key_logits(keras.ops.convert_to_tensor(x), key[None]))[:, 0]

    turned_away = np.mean(logits(fresh) < abstention_threshold(own, held_out))
    assert 0.005 <= turned_away <= 0.02
    assert np.mean(logits(fresh) < np.quantile(logits(own), 0.01)) > 3 * turned_away
    with pytest.raises(ValueError, match="at least 10 key examples. Received: 9"):
        abstention_threshold(own[:9])


@pytest.mark.backend_independent
def test_the_marginal_of_a_gaussian_key_is_the_key_of_those_features_alone():
    from kvlm.domain_experts.routing import marginal_key
    from kvlm.layers.moe.keys import gaussian_key

    features = RNG.normal(size=(400, 12)) @ RNG.normal(size=(12, 12)) * 0.1
    np.testing.assert_allclose(marginal_key(gaussian_key(features), 5), gaussian_key(features[:, :5]), atol=2e-3)


def test_question_key_admits_its_authors_questions_and_turns_away_other_words():
    """A vocabulary of 40 ids: the author asks with ids 1-20 (a Zipf-like unigram), another domain
    with ids 15-40. Fresh questions of the author fall below the threshold at about its quantile;
    questions with two of the other domain's own words (21-40) almost never pass."""
    from kvlm.domain_experts.routing import question_key, question_scores, question_threshold

    rng = np.random.default_rng(0)
    own_words = np.arange(1, 21)
    own_p = 1.0 / own_words / np.sum(1.0 / own_words)

    def questions(n, words, p=None):
        ids = rng.choice(words, size=(n, 8), p=p)
        ids[rng.integers(4, 9, size=(n, 1)) <= np.arange(8)] = 0  # 4 to 8 real tokens, then padding
        return ids

    own, held_out, fresh = questions(3000, own_words, own_p), questions(300, own_words, own_p), questions(5000, own_words, own_p)
    other = questions(5000, own_words, own_p)
    other[:, :2] = rng.integers(21, 41, size=(5000, 2))
    key = question_key(own, 41)
    assert key.shape == (41,) and np.isclose(np.exp(key).sum(), 1.0, atol=1e-4)
    threshold = question_threshold(own, 41, held_out, quantile=0.01)

    def scores(ids):
        return keras.ops.convert_to_numpy(question_scores(ids, key))

    assert np.mean(scores(fresh) < threshold) <= 0.02
    assert np.mean(scores(other) >= threshold) <= 0.02
    # Scores under several keys at once are the columns; padding never counts; an empty question scores 0.
    both = keras.ops.convert_to_numpy(question_scores(fresh[:5], np.stack([key, key[::-1]], 1)))
    np.testing.assert_allclose(both[:, 0], scores(fresh[:5]), atol=1e-6)
    np.testing.assert_allclose(scores(np.array([[3, 3, 0, 0], [0, 0, 0, 0]])), [key[3], 0.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 41\). Received: ids from 1 to 41"):
        question_key(np.array([[1, 41]]), 41)
