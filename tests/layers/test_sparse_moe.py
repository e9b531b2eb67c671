"""SparseMoE layer: numerics against dense references, dropping, gradients, losses, saving, jit."""

import math
import os

import keras
import numpy as np
import pytest
from moe_reference import softmax as _softmax
from moe_reference import to_numpy as _np

import kvlm
from kvlm.experts import ExpertNotFoundError, available
from kvlm.layers import FusionBlock
from kvlm.layers.moe import SparseMoE
from kvlm.layers.moe.banks import FFNBank, LayerBank, PluginBank

BACKEND = keras.backend.backend()
_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _all_experts(layer, x_flat):
    """Every built-in expert on every token: `(E, tokens, d)`."""
    bank = layer.bank
    w1, b1, w2, b2 = (_np(v) for v in (bank.inner_kernel, bank.inner_bias, bank.outer_kernel, bank.outer_bias))
    hidden = _gelu(np.einsum("td,edh->eth", x_flat, w1) + b1[:, None])
    return np.einsum("eth,ehd->etd", hidden, w2) + b2[:, None]


def _inputs(batch=2, seq=6, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, seq, d)).astype("float32")
    mask = np.ones((batch, seq), bool)
    mask[1, seq - 2 :] = False
    return x, mask


def _dense_reference(layer, x, mask, k, normalize=False):
    """All experts computed densely and mixed with the top-k router weights."""
    x_flat = x.reshape(-1, x.shape[-1])
    probs = _softmax(x_flat @ _np(layer.router_kernel))
    index = np.argsort(-probs, axis=1)[:, :k]
    gates = np.take_along_axis(probs, index, 1)
    if normalize:
        gates = gates / gates.sum(-1, keepdims=True)
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, index, gates, 1)
    out = np.einsum("te,etd->td", weights, _all_experts(layer, x_flat))
    return (out * mask.reshape(-1, 1)).reshape(x.shape)


def _randomize(layer, seed=0):
    """Fills the trainable weights with random values (cheaper than random initializers on eager JAX)."""
    rng = np.random.default_rng(seed)
    for v in layer.trainable_variables:
        fan_in = v.shape[-2] if len(v.shape) >= 2 else 10
        v.assign(rng.normal(size=v.shape, scale=1.0 / np.sqrt(fan_in)).astype("float32"))
    return layer


def _moe(*args, input_dim=8, seed=0, **kwargs):
    """A built SparseMoE with random weights."""
    layer = SparseMoE(*args, kernel_initializer="zeros", router_initializer="zeros", **kwargs)
    layer.build((None, input_dim))
    return _randomize(layer, seed)


def _set_router(layer, kernel):
    layer.router_kernel.assign(np.asarray(kernel, "float32"))


@pytest.mark.parametrize("k,normalize", [(1, False), (2, False), (2, True)])
def test_matches_dense_reference_without_drops(k, normalize):
    x, mask = _inputs()
    layer = _moe(4, top_k=k, expert_hidden_dim=16, eval_capacity_factor=None, normalize_gates=normalize)
    y = _np(layer(x, mask=mask))
    np.testing.assert_allclose(y, _dense_reference(layer, x, mask, k, normalize), atol=2e-5)
    assert float(_np(layer.dropped_token_fraction)) == 0.0
    load = _np(layer.expert_load)
    assert load.shape == (4,) and abs(load.sum() - 1) < 1e-6
    counts = layer.routing_counts(x, mask)
    assert counts.sum() == mask.sum() * k
    np.testing.assert_allclose(load, counts / counts.sum(), atol=1e-6)


def _overflow_layer(batch_prioritized):
    # k=1; x[..., 0] = score > 0 sends every token to expert 0 with a probability
    # that grows with the score, so capacity decides who is processed.
    layer = _moe(4, top_k=1, expert_hidden_dim=16, capacity_factor=1.0, batch_prioritized=batch_prioritized)
    kernel = np.zeros((8, 4), "float32")
    kernel[0] = [2.0, -2.0, -2.0, -2.0]
    _set_router(layer, kernel)
    return layer


@pytest.mark.parametrize("batch_prioritized", [True, False])
def test_overflow_drops_lowest_priority_tokens(batch_prioritized):
    scores = np.array([[0.3, 0.9, 0.1, 0.5], [0.7, 0.2, 0.8, 0.4]], "float32")
    rng = np.random.default_rng(1)
    x = np.concatenate([scores[..., None], rng.normal(size=(2, 4, 7)).astype("float32")], -1)
    mask = np.ones((2, 4), bool)
    mask[1, 2] = False  # the padding token has the 2nd highest score but must not take a slot
    layer = _overflow_layer(batch_prioritized)
    # capacity = ceil(1.0 * 1 * 8 / 4) = 2 slots for expert 0.
    y = _np(layer(x, mask=mask, training=True)).reshape(8, 8)
    kept = [1, 4] if batch_prioritized else [0, 1]  # scores 0.9 and 0.7 / the first two positions
    x_flat = x.reshape(8, 8)
    probs = _softmax(x_flat @ _np(layer.router_kernel))
    expected = _all_experts(layer, x_flat)[0] * probs[:, :1]
    for t in range(8):
        if t in kept:
            np.testing.assert_allclose(y[t], expected[t], atol=1e-5)
        else:
            np.testing.assert_array_equal(y[t], 0.0)
    np.testing.assert_allclose(float(_np(layer.dropped_token_fraction)), 5 / 7, atol=1e-6)
    np.testing.assert_allclose(_np(layer.expert_load), [1.0, 0.0, 0.0, 0.0])


def _gradients(layer, x, mask, training=True):
    """Gradients of sum(output^2) + aux losses w.r.t. the layer's trainable variables."""
    variables = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            y = layer(x, mask=mask, training=training)
            loss = tf.reduce_sum(tf.square(y)) + sum(layer.losses)
        grads = tape.gradient(loss, variables)
    elif BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(trainable):
            y, _, losses = layer.stateless_call(
                trainable, non_trainable, x, mask=mask, training=training, return_losses=True
            )
            return (y**2).sum() + sum(losses)

        grads = jax.jit(jax.grad(loss_fn))([v.value for v in variables])
    else:
        import torch

        y = layer(x, mask=mask, training=training)
        loss = (y**2).sum() + sum(layer.losses)
        grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
    return {v.path.split("/")[-1]: (np.zeros(v.shape) if g is None else _np(g)) for v, g in zip(variables, grads)}


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_reach_router_and_only_chosen_experts(k):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    x[..., 0] = 3.0  # a constant feature the router uses to rule out expert 3
    # No aux losses: the router's gradient must come through the combine weights.
    layer = _moe(4, top_k=k, expert_hidden_dim=16, capacity_factor=None, load_balance_weight=0, z_loss_weight=0)
    kernel = rng.normal(size=(8, 4)).astype("float32") * 0.3
    kernel[0, 3] = -20.0
    _set_router(layer, kernel)
    grads = _gradients(layer, x, np.ones((2, 6), bool))
    chosen = np.zeros(4, bool)
    chosen[np.argsort(-(x.reshape(12, 8) @ kernel), axis=1)[:, :k]] = True
    assert not chosen[3] and chosen.sum() >= 2
    assert np.abs(grads["router_kernel"]).sum() > 0
    for name in ("inner_kernel", "inner_bias", "outer_kernel", "outer_bias"):
        per_expert = np.abs(grads[name]).reshape(4, -1).sum(1)
        np.testing.assert_array_equal(per_expert > 0, chosen, err_msg=name)


def test_aux_losses_by_hand_and_padding_excluded():
    # The router kernel copies the first 4 input features: logits = x[..., :4].
    logits = np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [9.0, 9.0, 9.0, 9.0]])
    x = np.concatenate([logits, np.ones((4, 4))], -1)[None].astype("float32")
    mask = np.array([[True, True, True, False]])
    modality = np.array([[0, 1, 0, 2]], "int32")
    probs = _softmax(logits[:3])
    lse = np.log(np.exp(logits[:3]).sum(-1))
    entropy = -(probs * np.log(probs)).sum(-1)
    image_mean = probs[[0, 2]].mean(0)
    f = np.array([1, 1, 1, 0]) / 3  # top-1 experts 0, 1, 2
    expected = {
        "load_balance": 4 * (f * probs.mean(0)).sum(),
        "z_loss": np.mean(lse**2),
        "entropy": 1.0 * (entropy[0] + entropy[2]) / 2  # image_local
        + 2.0 * (image_mean * np.log(image_mean)).sum()  # image_global
        + 3.0 * entropy[1]  # text_local
        + 4.0 * -entropy[1],  # text_global
    }
    weights = {"image_local": 1.0, "image_global": 2.0, "text_local": 3.0, "text_global": 4.0}
    configs = {
        "load_balance": dict(load_balance_weight=1.0, z_loss_weight=0.0),
        "z_loss": dict(load_balance_weight=0.0, z_loss_weight=1.0),
        "entropy": dict(load_balance_weight=0.0, z_loss_weight=0.0, entropy_weights=weights),
    }
    for key, kwargs in configs.items():
        layer = _moe(4, top_k=1, expert_hidden_dim=16, **kwargs)
        _set_router(layer, np.eye(8, 4))
        y = _np(layer(x, mask=mask, modality=modality))
        assert len(layer.losses) == 1, key
        np.testing.assert_allclose(float(_np(layer.losses[0])), expected[key], rtol=1e-5, err_msg=key)
        # Changing the padding token changes neither real outputs nor losses.
        x2 = x.copy()
        x2[0, 3, :4] = [-7.0, 30.0, 0.0, 5.0]
        y2 = _np(layer(x2, mask=mask, modality=modality))
        np.testing.assert_allclose(y2[0, :3], y[0, :3], atol=1e-6)
        np.testing.assert_array_equal(y2[0, 3], 0.0)
        np.testing.assert_allclose(float(_np(layer.losses[0])), expected[key], rtol=1e-5, err_msg=key)


def test_expert_choice_matches_reference():
    x, mask = _inputs(seed=4)
    layer = _moe(4, top_k=1, router="experts_choose", expert_hidden_dim=16, eval_capacity_factor=1.0)
    y = _np(layer(x, mask=mask)).reshape(-1, 8)
    x_flat = x.reshape(-1, 8)
    probs = _softmax(x_flat @ _np(layer.router_kernel))
    outputs = _all_experts(layer, x_flat)
    capacity = 3  # ceil(1.0 * 1 * 12 / 4)
    expected = np.zeros_like(x_flat)
    chosen = np.zeros(len(x_flat), bool)
    for e in range(4):
        for t in np.argsort(-np.where(mask.ravel(), probs[:, e], -1))[:capacity]:
            expected[t] += probs[t, e] * outputs[e, t]
            chosen[t] = True
    np.testing.assert_allclose(y, expected, atol=2e-5)
    real = mask.ravel()
    np.testing.assert_allclose(float(_np(layer.dropped_token_fraction)), 1 - chosen[real].mean(), atol=1e-6)


@pytest.mark.tensorflow_only
def test_expert_choice_layer_parity_with_tf_models():
    import tensorflow as tf

    from official.nlp.modeling.layers import moe as tfm_moe

    x, _ = _inputs(batch=2, seq=8, d=8, seed=5)
    layer = _moe(4, top_k=2, router="experts_choose", expert_hidden_dim=16, eval_capacity_factor=1.0)
    y = _np(layer(x))
    capacity = 8  # ceil(1.0 * 2 * 16 / 4)
    reference = tfm_moe.ExpertsChooseMaskedRouter(4, use_bias=False, export_metrics=False)
    reference(tf.zeros((1, 16, 8)), expert_capacity=capacity)
    reference.router_weights.kernel.assign(_np(layer.router_kernel))
    routed = reference(tf.constant(x.reshape(1, 16, 8)), expert_capacity=capacity, training=False)
    dispatch_mask = routed.dispatch_mask.numpy()[0]  # (tokens, experts, capacity)
    combine = routed.combine_array.numpy()[0]
    expert_in = np.einsum("tec,td->ecd", dispatch_mask, x.reshape(16, 8))
    bank = layer.bank
    w1, b1, w2, b2 = (_np(v) for v in (bank.inner_kernel, bank.inner_bias, bank.outer_kernel, bank.outer_bias))
    expert_out = np.einsum("ech,ehd->ecd", _gelu(np.einsum("ecd,edh->ech", expert_in, w1) + b1[:, None]), w2)
    expert_out = expert_out + b2[:, None]
    expected = np.einsum("tec,ecd->td", combine, expert_out).reshape(x.shape)
    np.testing.assert_allclose(y, expected, atol=2e-5)


def test_statistics_and_noisy_gating():
    x, mask = _inputs(seed=6)
    layer = _moe(4, top_k=2, noisy_gating=0.5, seed=3, expert_hidden_dim=16)
    a = _np(layer(x, mask=mask))
    np.testing.assert_array_equal(a, _np(layer(x, mask=mask)))  # no noise in inference
    b = _np(layer(x, mask=mask, training=True))
    c = _np(layer(x, mask=mask, training=True))
    assert not np.allclose(b, c)
    entropy = float(_np(layer.router_entropy))
    assert 0.0 < entropy <= np.log(4) + 1e-6
    assert SparseMoE(4, noisy_gating=True).noise_std == 0.25


def test_shared_expert_and_rank2_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 8)).astype("float32")
    layer = _moe(4, top_k=1, expert_hidden_dim=16, shared_expert=True, eval_capacity_factor=None)
    y = _np(layer(x))
    moe_only = _dense_reference(layer, x[None], np.ones((1, 12), bool), 1)[0]
    np.testing.assert_allclose(y, moe_only + _np(layer.shared_ffn(x)), atol=2e-5)


def test_config_round_trip():
    layer = _moe(
        4, top_k=1, router="experts_choose", capacity_factor=1.5, eval_capacity_factor=None,
        expert_hidden_dim=16, shared_expert=True, noisy_gating=0.1, batch_prioritized=False,
        entropy_weights={"image_local": 0.1}, z_loss_weight=0.0, name="moe",
    )
    config = layer.get_config()
    clone = SparseMoE.from_config(config)
    assert clone.get_config() == config
    x, mask = _inputs()
    y = _np(layer(x, mask=mask))
    clone(x, mask=mask)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(_np(clone(x, mask=mask)), y, atol=1e-6)


def _model_inputs(n=4):
    x, mask = _inputs(batch=n)
    modality = np.zeros((n, 6), "int32")
    modality[:, 3:] = 1
    return {"x": x, "mask": mask, "modality": modality}


def test_fit_trains_and_updates_statistics():
    moe = _moe(4, top_k=2, expert_hidden_dim=16, entropy_weights=0.01, name="moe")
    x = keras.Input((6, 8), name="x")
    mask = keras.Input((6,), dtype="bool", name="mask")
    modality = keras.Input((6,), dtype="int32", name="modality")
    h = moe(x, mask=mask, modality=modality)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model({"x": x, "mask": mask, "modality": modality}, out)
    model.compile(optimizer="sgd", loss="mse")
    before = _np(moe.router_kernel).copy()
    history = model.fit(_model_inputs(), np.ones((4, 1), "float32"), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(_np(moe.router_kernel), before)
    load = _np(moe.expert_load)  # updated by the compiled train step on every backend
    assert abs(load.sum() - 1.0) < 1e-5


def test_keras_save_load(tmp_path):
    moe = _moe(4, top_k=2, expert_hidden_dim=16, shared_expert=True, name="moe")
    x = keras.Input((6, 8), name="x")
    mask = keras.Input((6,), dtype="bool", name="mask")
    model = keras.Model({"x": x, "mask": mask}, moe(x, mask=mask))
    x_value, mask_value = _inputs()
    inputs = {"x": x_value, "mask": mask_value}
    expected = _np(model(inputs))
    path = str(tmp_path / "moe.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(_np(restored(inputs)), expected, atol=1e-6)
    assert restored.get_layer("moe").get_config() == moe.get_config()


def test_fusion_block_round_trip():
    # A deserialized FusionBlock gets its SparseMoE built from the saved build config and
    # then builds it again: the second build must be a no-op.
    block = FusionBlock(8, 2, 16, ffn=_moe(4, expert_hidden_dim=16, name="moe"), name="block")
    block.build((None, 6, 8))
    clone = FusionBlock.from_config(block.get_config())
    clone.build((None, 6, 8))
    assert [v.shape for v in clone.weights] == [v.shape for v in block.weights]
    assert clone.ffn.get_config() == block.ffn.get_config()


def test_jit_matches_eager():
    x, mask = _inputs()
    layer = _moe(4, top_k=2, expert_hidden_dim=16, capacity_factor=0.75)
    eager = _np(layer(x, mask=mask, training=True))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        jitted = tf.function(lambda a, m: layer(a, mask=m, training=True), jit_compile=True)
        np.testing.assert_allclose(_np(jitted(x, mask)), eager, atol=1e-5)
        # Unknown batch size (as in `fit` after retracing): capacity becomes a tensor.
        dynamic = tf.function(
            lambda a, m: layer(a, mask=m, training=True),
            input_signature=[tf.TensorSpec((None, 6, 8)), tf.TensorSpec((None, 6), tf.bool)],
        )
        np.testing.assert_allclose(_np(dynamic(x, mask)), eager, atol=1e-5)
        ec = _moe(4, router="experts_choose", expert_hidden_dim=16)
        expected = _np(ec(x, mask=mask))
        dynamic = tf.function(
            lambda a, m: ec(a, mask=m),
            input_signature=[tf.TensorSpec((None, 6, 8)), tf.TensorSpec((None, 6), tf.bool)],
        )
        np.testing.assert_allclose(_np(dynamic(x, mask)), expected, atol=1e-5)
    elif BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        @jax.jit
        def run(a, m):
            return layer.stateless_call(trainable, non_trainable, a, mask=m, training=True)

        y, new_state = run(x, mask)
        np.testing.assert_allclose(_np(y), eager, atol=1e-5)
        names = [v.path.split("/")[-1] for v in layer.non_trainable_variables]
        dropped = new_state[names.index("dropped_token_fraction")]
        np.testing.assert_allclose(_np(dropped), _np(layer.dropped_token_fraction), atol=1e-6)
        # An unknown batch is a symbolic dimension on JAX (Keras's symbolic build, jax.export and
        # jax2tf with a dynamic batch): capacity must stay a static expression of it, never a
        # traced value passed to jax.jit as a static argument.
        from jax import export

        (batch,) = export.symbolic_shape("batch")
        specs = (jax.ShapeDtypeStruct((batch, 6, 8), "float32"), jax.ShapeDtypeStruct((batch, 6), "bool"))
        ec = _moe(4, router="experts_choose", expert_hidden_dim=16)
        for moe, training in ((layer, True), (ec, False)):
            expected = _np(moe(x, mask=mask, training=training))
            state = ([v.value for v in moe.trainable_variables], [v.value for v in moe.non_trainable_variables])

            def forward(a, m, moe=moe, training=training, state=state):
                return moe.stateless_call(*state, a, mask=m, training=training)[0]

            exported = export.export(jax.jit(forward))(*specs)
            np.testing.assert_allclose(_np(exported.call(x, mask)), expected, atol=1e-5)
        spec = keras.KerasTensor((None, 6, 8))
        assert layer.compute_output_spec(spec, mask=keras.KerasTensor((None, 6), "bool")).shape == (None, 6, 8)
    else:
        pytest.skip("no jit path is exercised on the torch backend")


# ----------------------------------------------------------------------------- expert banks


@keras.saving.register_keras_serializable(package="kvlm_test")
class _ScaledDense(keras.layers.Dense):
    pass


def _slice_reference(layer, x, mask, k):
    """Each bank layer on every token, mixed with the top-k router weights."""
    x_flat = x.reshape(-1, x.shape[-1])
    outputs = np.stack([_np(e(x_flat)) for e in layer.bank.expert_layers])
    probs = _softmax(x_flat @ _np(layer.router_kernel))
    index = np.argsort(-probs, 1)[:, :k]
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, index, np.take_along_axis(probs, index, 1), 1)
    return (np.einsum("te,etd->td", weights, outputs) * mask.reshape(-1, 1)).reshape(x.shape)


def test_layer_bank_experts_each_run_on_their_slice(tmp_path):
    x, mask = _inputs()
    experts = [
        _ScaledDense(8, activation="relu", name="legal"),
        _ScaledDense(8, activation="tanh", name="medical"),
        _ScaledDense(8, use_bias=False, name="retail"),
    ]
    layer = SparseMoE(LayerBank(experts), top_k=2, eval_capacity_factor=None, name="moe")
    assert layer.expert_names == ["legal", "medical", "retail"] and not layer.built
    y = _np(layer(x, mask=mask))
    np.testing.assert_allclose(y, _slice_reference(layer, x, mask, 2), atol=2e-5)
    config = layer.get_config()
    assert config["experts"]["class_name"] == "LayerBank" and config["expert_distributions"] == {}
    assert SparseMoE.from_config(config).get_config() == config

    model = keras.Sequential([keras.Input((6, 8)), layer])
    path = str(tmp_path / "bank.keras")
    model.save(path)
    np.testing.assert_allclose(_np(keras.saving.load_model(path)(x)), _np(model(x)), atol=1e-6)


def test_plugin_bank_builds_named_experts_and_saves_them_by_name(tmp_path):
    x, mask = _inputs()
    layer = SparseMoE(
        ["legal", "medical", "retail"], top_k=2, eval_capacity_factor=None,
        expert_options={"legal": {"rank": 2}}, name="moe",
    )
    assert isinstance(layer.bank, PluginBank) and layer.num_experts == 3  # resolved before build
    y = _np(layer(x, mask=mask))
    legal, medical, retail = layer.bank.expert_layers
    assert (type(legal).__name__, legal.rank, type(retail).__name__) == ("LegalExpert", 2, "RetailExpert")
    np.testing.assert_allclose(y, _slice_reference(layer, x, mask, 2), atol=2e-5)
    config = layer.get_config()
    assert config["experts"] == ["legal", "medical", "retail"]
    assert config["expert_distributions"] == {"legal": "kvlm-legal", "medical": "kvlm-medical", "retail": "kvlm-retail"}

    model = keras.Sequential([keras.Input((6, 8)), layer])
    path = tmp_path / "plugins.keras"
    model.save(path)
    np.testing.assert_allclose(_np(kvlm.load_model(path)(x)), _np(model(x)), atol=1e-6)


def test_installed_experts_and_a_missing_plugin():
    layer = SparseMoE("installed", top_k=1)
    assert layer.expert_names == sorted(available()) and len(layer.expert_names) >= 4
    config = layer.get_config()
    assert config["expert_distributions"] == {n: i.distribution for n, i in available().items()}
    config["experts"] = ["ffn", "ghost"]  # a saved model naming an expert whose plugin is gone
    config["expert_distributions"]["ghost"] = "acme-kvlm-experts"
    with pytest.raises(ExpertNotFoundError, match="pip install acme-kvlm-experts"):
        SparseMoE.from_config(config)
    with pytest.raises(ExpertNotFoundError, match="pip install kvlm-dermatology|Unknown expert 'dermatology'"):
        SparseMoE(["ffn", "dermatology"], top_k=1)


def test_built_in_experts_are_one_ffn_bank():
    layer = _moe(3, top_k=1, expert_hidden_dim=5)
    assert isinstance(layer.bank, FFNBank) and layer.bank.expert_layers == []
    assert [tuple(w.shape) for w in layer.bank.weights] == [(3, 8, 5), (3, 5), (3, 5, 8), (3, 8)]
    assert layer.bank.inner_kernel.path.endswith("experts/inner_kernel")
    assert layer.get_config()["experts"] == 3


def test_aux_losses_are_part_of_the_training_loss():
    """fit's loss is the task loss plus the layer's weighted aux losses (nothing silently off)."""
    moe = _moe(4, top_k=1, expert_hidden_dim=16, load_balance_weight=1.0, z_loss_weight=1.0, name="moe")
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="ones")(moe(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    x, _ = _inputs(batch=4)
    target = np.zeros((4, 6, 1), "float32")
    task = float(np.mean(_np(model(x, training=True)) ** 2))
    aux = float(sum(_np(loss) for loss in model.losses))
    assert len(model.losses) == 2 and aux > 1.0  # load balance >= 1 at its optimum, plus the z-loss
    history = model.fit(x, target, batch_size=4, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(history.history["loss"][0], task + aux, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(experts=0), "experts=0"),
        (dict(experts="all"), "experts='all'"),
        (dict(experts=["ffn", "ffn"]), "unique"),
        (dict(experts=4, top_k=5), "top_k=5"),
        (dict(experts=4, router="random"), "router='random'"),
        (dict(experts=4, capacity_factor=0.0), "capacity_factor=0.0"),
        (dict(experts=4, noisy_gating=-1.0), "noisy_gating=-1.0"),
        (dict(experts=4, entropy_weights={"video_local": 1.0}), "entropy_weights="),
        (dict(experts=4, z_loss_weight=-1.0), "z_loss_weight=-1.0"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMoE(**kwargs)


@pytest.mark.tensorflow_only
def test_routing_in_a_graph_logs_no_error_line_with_onednn():
    """TensorFlow's oneDNN rewrite logs `E ... oneDNN supports DT_INT32 only on platforms with AVX-512`
    for int32 ops it could take over (transposes); routing keeps its int32 index tensors out of them."""
    import subprocess
    import sys

    script = (
        "import tensorflow as tf, numpy as np; from kvlm.layers.moe import SparseMoE;"
        "layer = SparseMoE(experts=4, top_k=2, expert_hidden_dim=8);"
        "x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype('float32');"
        "print(tf.function(lambda a: layer(a, training=True))(x).shape)"
    )
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2, 5, 8)" in result.stdout
    errors = [line for line in result.stderr.splitlines() if "oneDNN" in line]
    assert not errors, errors
