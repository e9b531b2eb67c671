"""SparseMoE key routing: fixed per-expert router keys, token and sequence scope, against NumPy references."""

import json

import keras
import numpy as np
import pytest
from moe_reference import softmax as _softmax
from moe_reference import to_numpy as _np

from kvlm.layers.moe import SparseMoE
from kvlm.layers.moe.banks import LayerBank

BACKEND = keras.backend.backend()
D, E = 8, 3
ACTIVATIONS = ("relu", "tanh", None)


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _keys(seed=0):
    """Three keys of different norms (the layer must normalize them)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(E, D)) * np.array([[0.5], [2.0], [7.0]])).astype("float32")


def _near_keys(keys, choices, seed=1, noise=0.3):
    """Tokens `(..., D)` close to the key of `choices[...]`, with random norms."""
    rng = np.random.default_rng(seed)
    directions = _unit(keys)[choices] + noise * rng.normal(size=choices.shape + (D,))
    return (directions * rng.uniform(0.5, 3.0, size=choices.shape + (1,))).astype("float32")


def _bank(seed=0):
    """Three Dense experts with random weights (relu, tanh, linear)."""
    experts = [keras.layers.Dense(D, activation=a, name=f"expert_{i}") for i, a in enumerate(ACTIVATIONS)]
    bank = LayerBank(experts)
    bank.build((None, D))
    rng = np.random.default_rng(seed)
    for v in bank.weights:
        v.assign(rng.normal(size=v.shape, scale=0.5).astype("float32"))
    return bank


def _expert_outputs(layer, x_flat):
    """NumPy outputs of every Dense expert on every token: `(E, tokens, D)`."""
    outputs = []
    for expert, activation in zip(layer.bank.expert_layers, ACTIVATIONS):
        h = x_flat @ _np(expert.kernel) + _np(expert.bias)
        outputs.append({"relu": np.maximum(h, 0.0), "tanh": np.tanh(h), None: h}[activation])
    return np.stack(outputs)


def _keyed(keys, scope="token", temperature=0.5, **kwargs):
    kwargs = dict(top_k=1, eval_capacity_factor=None, load_balance_weight=0.0, z_loss_weight=0.0) | kwargs
    return SparseMoE(_bank(), router_keys=keys, router_temperature=temperature, routing_scope=scope, **kwargs)


def _routing_features(x, mask, scope):
    """NumPy routing features: normalized tokens, or each sequence's normalized mean of them."""
    features = _unit(x)
    if scope == "sequence":
        total = (features * mask[..., None]).sum(1, keepdims=True)
        features = np.broadcast_to(_unit(total), x.shape)
    return features.reshape(-1, x.shape[-1])


def _reference(layer, x, mask, keys, temperature, scope):
    """Chosen expert per token (top-1 of cosine(features, keys)) and the output gate * expert(x)."""
    x_flat = x.reshape(-1, D)
    probs = _softmax(_routing_features(x, mask, scope) @ _unit(keys).T / temperature)
    choice = probs.argmax(-1)
    gate = probs[np.arange(len(choice)), choice]
    outputs = _expert_outputs(layer, x_flat)[choice, np.arange(len(choice))]
    return choice, (gate[:, None] * outputs * mask.reshape(-1, 1)).reshape(x.shape)


def _counts(choice, mask):
    return np.bincount(choice[mask.reshape(-1)], minlength=E)


def _token_choices(layer, x):
    """Expert of each token, read with `routing_counts` on a one-token mask (token scope)."""
    flat = x.reshape(-1, D)
    choices = []
    for t in range(len(flat)):
        one = np.zeros(len(flat), bool)
        one[t] = True
        counts = layer.routing_counts(flat, one)
        assert counts.sum() == 1
        choices.append(int(counts.argmax()))
    return np.array(choices)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_token_scope_routes_by_cosine_to_the_keys(temperature):
    keys = _keys()
    targets = np.array([[0, 1, 2, 2, 1, 0], [1, 1, 0, 2, 0, 2]])
    x = _near_keys(keys, targets)
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    layer = _keyed(keys, temperature=temperature)
    y = _np(layer(x, mask=mask))
    choice, expected = _reference(layer, x, mask, keys, temperature, "token")
    np.testing.assert_array_equal(choice, targets.reshape(-1))  # the data route where they were drawn
    np.testing.assert_allclose(y, expected, atol=2e-5)
    np.testing.assert_array_equal(_token_choices(layer, x), choice)
    np.testing.assert_array_equal(layer.routing_counts(x, mask), _counts(choice, mask))
    np.testing.assert_allclose(_np(layer.router_keys), _unit(keys), atol=1e-6)


def test_sequence_scope_routes_each_sequence_as_one():
    keys = _keys()
    # Sequence 0 leans to expert 2, sequence 1 to expert 0; their tokens alone would go elsewhere too.
    x = _near_keys(keys, np.array([[2, 2, 2, 1, 0, 2], [0, 1, 0, 0, 2, 1]]), noise=0.2)
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    layer = _keyed(keys, scope="sequence")
    y = _np(layer(x, mask=mask))
    choice, expected = _reference(layer, x, mask, keys, 0.5, "sequence")
    np.testing.assert_array_equal(choice.reshape(2, 6)[mask], [2] * 6 + [0] * 4)
    token_choice, _ = _reference(layer, x, mask, keys, 0.5, "token")
    assert len(set(token_choice[:6])) == 3  # token routing would split sequence 0
    np.testing.assert_allclose(y, expected, atol=2e-5)
    np.testing.assert_array_equal(layer.routing_counts(x, mask), [4, 0, 6])

    # Padding tokens do not count in the mean and are not routed, whatever their features.
    x_padded = x.copy()
    x_padded[1, 4:] = 50.0 * _unit(keys)[1]
    y_padded = _np(layer(x_padded, mask=mask))
    np.testing.assert_allclose(y_padded, y, atol=1e-6)
    np.testing.assert_array_equal(y_padded[1, 4:], 0.0)
    np.testing.assert_array_equal(layer.routing_counts(x_padded, mask), [4, 0, 6])
    # Without the mask those tokens are real and move sequence 1 to expert 1.
    no_mask = np.ones((2, 6), bool)
    choice, expected = _reference(layer, x_padded, no_mask, keys, 0.5, "sequence")
    np.testing.assert_array_equal(choice.reshape(2, 6)[1], [1] * 6)
    np.testing.assert_allclose(_np(layer(x_padded)), expected, atol=2e-5)
    np.testing.assert_array_equal(layer.routing_counts(x_padded), [0, 6, 6])


def test_sequence_scope_with_the_learned_router_routes_mean_features():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5, D)).astype("float32")
    mask = np.ones((3, 5), bool)
    mask[2, 3:] = False
    kernel = rng.normal(size=(D, E)).astype("float32")
    layer = SparseMoE(_bank(), top_k=1, eval_capacity_factor=None, routing_scope="sequence")
    layer.build((None, 5, D))
    layer.router_kernel.assign(kernel)
    mean = (x * mask[..., None]).sum(1, keepdims=True) / mask.sum(1)[:, None, None]
    probs = _softmax(np.broadcast_to(mean, x.shape).reshape(-1, D) @ kernel)
    choice = probs.argmax(-1)
    outputs = _expert_outputs(layer, x.reshape(-1, D))[choice, np.arange(15)]
    expected = (probs.max(-1)[:, None] * outputs * mask.reshape(-1, 1)).reshape(x.shape)
    np.testing.assert_allclose(_np(layer(x, mask=mask)), expected, atol=2e-5)
    np.testing.assert_array_equal(layer.routing_counts(x, mask), _counts(choice, mask))


def _names(weights):
    return [w.path.split("/")[-1] for w in weights]


def test_keys_are_fixed_during_fit():
    """A strong load-balancing loss trains everything around the layer but cannot move the keys."""
    keys = _keys()
    moe = _keyed(keys, load_balance_weight=1.0, z_loss_weight=1e-3, capacity_factor=None, name="moe")
    inputs = keras.Input((6, D))
    upstream = keras.layers.Dense(D, name="upstream")
    h = keras.layers.GlobalAveragePooling1D()(moe(upstream(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    assert "router_keys" in _names(moe.non_trainable_weights)
    assert "router_keys" not in _names(model.trainable_weights)
    assert "router_kernel" not in _names(moe.weights)

    fixed = _near_keys(keys, np.array([[0, 1, 2, 0, 1, 2]]))
    choices = _token_choices(moe, fixed)
    stored = _np(moe.router_keys).copy()
    experts_before = [_np(w).copy() for w in moe.bank.trainable_weights]
    upstream_before = _np(upstream.kernel).copy()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 6, D)).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    history = model.fit(x, rng.normal(size=(8, 1)).astype("float32"), batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(_np(upstream.kernel), upstream_before)  # training did happen
    assert any(not np.allclose(_np(w), b) for w, b in zip(moe.bank.trainable_weights, experts_before))
    np.testing.assert_array_equal(_np(moe.router_keys), stored)
    np.testing.assert_array_equal(_token_choices(moe, fixed), choices)
    np.testing.assert_array_equal(choices, [0, 1, 2, 0, 1, 2])


def test_set_router_keys_changes_the_routing():
    keys = _keys()
    x = _near_keys(keys, np.array([[0, 1, 2, 0, 1, 2]]))
    mask = np.ones((1, 6), bool)
    layer = _keyed(keys)
    np.testing.assert_array_equal(_token_choices(layer, x), [0, 1, 2, 0, 1, 2])
    swapped = keys[[2, 0, 1]] * 3.0  # expert e now holds the key of expert e - 1
    layer.set_router_keys(swapped)
    np.testing.assert_allclose(_np(layer.router_keys), _unit(swapped), atol=1e-6)
    choice, expected = _reference(layer, x, mask, swapped, 0.5, "token")
    np.testing.assert_array_equal(choice, [1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(_token_choices(layer, x), choice)
    np.testing.assert_allclose(_np(layer(x, mask=mask)), expected, atol=2e-5)
    assert layer.get_config()["router_keys"] == swapped.tolist()

    unbuilt = _keyed(keys)
    unbuilt.set_router_keys(swapped)  # used when the layer is built
    np.testing.assert_array_equal(_token_choices(unbuilt, x), [1, 2, 0, 1, 2, 0])


@pytest.mark.parametrize("scope", ["token", "sequence"])
def test_keras_round_trip(tmp_path, scope):
    keys = _keys()
    moe = _keyed(keys, scope=scope, temperature=0.2, name="moe")
    x_in = keras.Input((6, D), name="x")
    mask_in = keras.Input((6,), dtype="bool", name="mask")
    model = keras.Model({"x": x_in, "mask": mask_in}, moe(x_in, mask=mask_in))
    x = _near_keys(keys, np.array([[0, 1, 2, 2, 1, 0], [1, 2, 0, 2, 0, 2]]))
    mask = np.ones((2, 6), bool)
    mask[0, 5] = False
    inputs = {"x": x, "mask": mask}
    expected = _np(model(inputs))
    config = moe.get_config()
    assert json.loads(json.dumps(config))["router_keys"] == keys.tolist()
    assert (config["router_temperature"], config["routing_scope"]) == (0.2, scope)
    assert SparseMoE.from_config(config).get_config() == config

    path = str(tmp_path / "keys.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    layer = restored.get_layer("moe")
    np.testing.assert_allclose(_np(restored(inputs)), expected, atol=1e-6)
    np.testing.assert_array_equal(_np(layer.router_keys), _np(moe.router_keys))
    np.testing.assert_array_equal(layer.routing_counts(x, mask), moe.routing_counts(x, mask))
    assert json.dumps(layer.get_config()) == json.dumps(config)  # JSON: build shapes come back as lists


@pytest.mark.parametrize("scope", ["token", "sequence"])
def test_jit_matches_eager(scope):
    keys = _keys()
    layer = _keyed(keys, scope=scope, capacity_factor=1.0)
    x = _near_keys(keys, np.array([[0, 1, 2, 2, 1, 0], [1, 1, 0, 2, 0, 2]]))
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    eager = _np(layer(x, mask=mask, training=True))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        dynamic = tf.function(
            lambda a, m: layer(a, mask=m, training=True),
            input_signature=[tf.TensorSpec((None, 6, D)), tf.TensorSpec((None, 6), tf.bool)],
        )
        np.testing.assert_allclose(_np(dynamic(x, mask)), eager, atol=1e-5)
    elif BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        run = jax.jit(lambda a, m: layer.stateless_call(trainable, non_trainable, a, mask=m, training=True)[0])
        np.testing.assert_allclose(_np(run(x, mask)), eager, atol=1e-5)
    else:
        pytest.skip("no jit path is exercised on the torch backend")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(router_keys=np.ones((2, D))), r"router_keys.*Received: router_keys.shape=\(2, 8\)"),
        (dict(router_keys=np.ones(D)), r"router_keys.*Received: router_keys.shape=\(8,\)"),
        (dict(router_keys=[[1.0, 2.0], [3.0]]), "router_keys.*Received:"),
        (dict(router_keys=np.eye(E, D) * [[1.0], [0.0], [1.0]]), r"router_keys.*Received: zero router_keys.*expert_1"),
        (dict(router_keys=np.full((E, D), np.nan)), "router_keys.*Received:"),
        (dict(router_temperature=0.0), "Received: router_temperature=0.0"),
        (dict(router_temperature=-1.0), "Received: router_temperature=-1.0"),
        (dict(router_temperature="cold"), "Received: router_temperature='cold'"),
        (dict(routing_scope="document"), "Received: routing_scope='document'"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMoE(E, **kwargs)


def test_rejects_bad_keys_later():
    layer = SparseMoE(E, router_keys=np.ones((E, 4)))
    with pytest.raises(ValueError, match=r"router_keys.*d=8.*Received: router_keys.shape=\(3, 4\)"):
        layer.build((None, 6, D))
    layer = _keyed(_keys())
    layer.build((None, D))
    with pytest.raises(ValueError, match=r"router_keys.*Received: router_keys.shape=\(3, 4\)"):
        layer.set_router_keys(np.ones((E, 4)))
    with pytest.raises(ValueError, match="Received: zero router_keys"):
        layer.set_router_keys(np.zeros((E, D)))
    with pytest.raises(ValueError, match="Received: router_keys=None"):
        SparseMoE(E).set_router_keys(_keys())
    sequence = _keyed(_keys(), scope="sequence")
    with pytest.raises(ValueError, match=r"rank 3.*Received: x.shape=\(12, 8\)"):
        sequence(np.ones((12, D), "float32"))


def _gaussian_keys(seed=0):
    """Gaussian keys fitted on three clusters that share their mean direction and differ in spread."""
    from kvlm.layers.moe.keys import gaussian_key

    rng = np.random.default_rng(seed)
    centre = _unit(rng.normal(size=D))

    def draw(n):
        return [_unit(centre + s * rng.normal(size=(n, D))).astype("float32") for s in (0.03, 0.15, 1.0)]

    return np.stack([gaussian_key(x) for x in draw(400)]).astype("float32"), draw


def _gaussian_logits(features, keys):
    """NumPy log-likelihoods (up to a constant) of unit `features (n, D)` under each key."""
    means, factors = keys[:, 0].astype(np.float64), keys[:, 1:].astype(np.float64)
    z = np.einsum("ned,edk->nek", features[:, None, :] - means[None], factors)
    return -0.5 * (z**2).sum(-1) + np.log(np.abs(np.diagonal(factors, axis1=1, axis2=2))).sum(-1)


def test_gaussian_keys_route_by_log_likelihood_where_cosine_cannot():
    keys, draw = _gaussian_keys()
    layer = SparseMoE(_bank(), top_k=1, router_keys=keys, router_temperature=1.0, routing_scope="token",
                      eval_capacity_factor=None, load_balance_weight=0.0, z_loss_weight=0.0)
    x = np.concatenate(draw(50))
    truth = np.repeat(np.arange(E), 50)
    layer.build((None, D))
    np.testing.assert_array_equal(_np(layer.router_keys), keys)  # stored as given
    from kvlm.layers.moe.keys import key_logits

    logits = _np(key_logits(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(keys)))
    np.testing.assert_allclose(logits, _gaussian_logits(x, keys), rtol=1e-4, atol=1e-2)
    choices = _token_choices(layer, x)
    np.testing.assert_array_equal(choices, _gaussian_logits(x, keys).argmax(-1))
    assert (choices == truth).mean() >= 0.9
    # The clusters share a mean direction: cosine keys of their means cannot tell them apart.
    cosine = (x @ _unit(np.stack([s.mean(0) for s in draw(400)])).T).argmax(-1)
    assert (cosine == truth).mean() <= 0.7


def test_gaussian_keys_sequence_scope_and_round_trip(tmp_path):
    keys, _ = _gaussian_keys()
    layer = SparseMoE(_bank(), top_k=1, router_keys=keys, routing_scope="sequence", eval_capacity_factor=None,
                      load_balance_weight=0.0, z_loss_weight=0.0, name="moe")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6, D)).astype("float32")
    mask = np.ones((4, 6), bool)
    mask[1, 4:] = False
    y = _np(layer(x, mask=mask))
    features = _routing_features(x, mask, "sequence")
    choice = _gaussian_logits(features, keys).argmax(-1)
    expected = _expert_outputs(layer, x.reshape(-1, D))[choice, np.arange(len(choice))] * mask.reshape(-1, 1)
    np.testing.assert_allclose(y, expected.reshape(x.shape), atol=1e-5)  # top-1 normalized gates are 1
    inputs = keras.Input((6, D))
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "gaussian.keras")
    restored = keras.saving.load_model(tmp_path / "gaussian.keras")
    np.testing.assert_allclose(_np(restored(x)), _np(model(x)), atol=1e-6)


def test_rejects_bad_gaussian_keys():
    keys, _ = _gaussian_keys()
    upper = keys.copy()
    upper[1, 1, 2] = 1.0  # factor of expert 1 not lower-triangular
    with pytest.raises(ValueError, match=r"lower-triangular.*Received: invalid precision factors for experts \['expert_1'\]"):
        SparseMoE(_bank(), router_keys=upper)
    with pytest.raises(ValueError, match=r"Received: router_keys.shape=\(3, 8, 8\)"):
        SparseMoE(_bank(), router_keys=keys[:, 1:, :])
