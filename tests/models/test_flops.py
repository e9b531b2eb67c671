import keras
import pytest

from kvlm.layers.moe import SparseMoE
from kvlm.models import VLMClassifier
from kvlm.models.flops import count_parameters, forward_flops, model_profile


def test_dense_flops_exact():
    layer = keras.layers.Dense(5)
    layer.build((None, 3, 4))
    # 3 tokens x (4 * 5 multiply-adds * 2 + 5 bias additions).
    assert forward_flops(layer, (None, 3, 4)) == 3 * (2 * 4 * 5 + 5) == 135
    no_bias = keras.layers.Dense(5, use_bias=False)
    no_bias.build((None, 4))
    assert forward_flops(no_bias, (None, 4)) == 40
    assert count_parameters(layer) == {"total": 25, "trainable": 25, "active": 25}


def test_conv_flops_exact():
    layer = keras.layers.Conv2D(8, 3, strides=2, padding="same")
    layer.build((None, 10, 10, 3))
    # 5x5 output positions x (3*3*3*8 multiply-adds * 2 + 8 bias additions).
    assert forward_flops(layer, (None, 10, 10, 3)) == 25 * (2 * 216 + 8) == 11000
    valid = keras.layers.Conv2D(2, 2, padding="valid", use_bias=False)
    valid.build((None, 4, 4, 1))
    assert forward_flops(valid, (None, 4, 4, 1)) == 9 * 2 * 4 * 2 == 144


def test_attention_flops():
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    layer.build((None, 6, 8), (None, 6, 8))
    projections = 3 * 6 * (2 * 8 * 2 * 4 + 2 * 4) + 6 * (2 * 2 * 4 * 8 + 8)
    products = 2 * 6 * 6 * 2 * (4 + 4)
    assert forward_flops(layer, (None, 6, 8)) == projections + products


def test_moe_counts_top_k_experts():
    shape = (None, 5, 8)
    flops = {}
    for top_k in (1, 2):
        layer = SparseMoE(experts=4, top_k=top_k, expert_hidden_dim=16)
        layer.build(shape)
        flops[top_k] = forward_flops(layer, shape)
        params = count_parameters(layer)
        per_expert = 8 * 16 + 16 + 16 * 8 + 8
        assert params["total"] - params["active"] == (4 - top_k) * per_expert
    per_token_expert = 2 * 8 * 16 + 16 + 2 * 16 * 8 + 8
    assert flops[2] - flops[1] == 5 * per_token_expert
    assert flops[1] == 5 * (2 * 8 * 4) + 5 * per_token_expert


def test_classifier_profile_dense_vs_moe():
    dense = VLMClassifier.from_preset("kvlm_tiny", num_classes=5, vocabulary_size=50, encoder="cnn")
    moe = VLMClassifier.from_preset(
        "kvlm_tiny", num_classes=5, vocabulary_size=50, encoder="cnn", moe={"experts": 4, "top_k": 2}
    )
    d, m = model_profile(dense), model_profile(moe)
    assert d["parameters"]["total"] == dense.count_params() == d["parameters"]["active"]
    assert d["moe_layers"] == 0 and m["moe_layers"] == 1
    assert m["parameters"]["active"] < m["parameters"]["total"]
    assert m["flops"] > d["flops"] > 0
    # The answer head alone: 64 -> 5 logits.
    assert forward_flops(dense.get_layer("logits"), (None, 64)) == 2 * 64 * 5 + 5


def test_layer_needs_input_shape():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="input_shape"):
        forward_flops(layer)
