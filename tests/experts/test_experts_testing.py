"""`kvlm.testing` accepts good experts and datasets and catches broken ones."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import kvlm.testing
from kvlm.data.example import Example
from kvlm.experts.builtin import FFNExpert


@keras.saving.register_keras_serializable(package="kvlm_testing_fixtures")
class MixesTokens(FFNExpert):
    """Adds the mean over tokens: not token-wise, so it cannot be an MoE expert."""

    def call(self, x, training=None):
        return super().call(x) + ops.mean(x, axis=-2, keepdims=True)


@keras.saving.register_keras_serializable(package="kvlm_testing_fixtures")
class DeadWeight(FFNExpert):
    """Owns a weight that never reaches the output."""

    def build(self, input_shape):
        super().build(input_shape)
        self.unused = self.add_weight(shape=(3,), initializer="ones", name="unused")


@keras.saving.register_keras_serializable(package="kvlm_testing_fixtures")
class ForgetsConfig(FFNExpert):
    """Drops `hidden_dim` from its config, so a reloaded layer has other shapes."""

    def get_config(self):
        config = super().get_config()
        config["hidden_dim"] = None
        return config


@keras.saving.register_keras_serializable(package="kvlm_testing_fixtures")
class ContractOnly(keras.layers.Layer):
    """Written only against the documented contract: no compute_output_shape, no kvlm base class."""

    def __init__(self, d_model, **kwargs):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.dense = keras.layers.Dense(d_model)

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model}


@keras.saving.register_keras_serializable(package="kvlm_testing_fixtures")
class NeedsConcreteShapes(ContractOnly):
    """Flattens with Python ints taken from the input shape: runs eagerly, cannot be traced symbolically."""

    def call(self, x):
        flat = ops.reshape(x, (int(np.prod(x.shape[:-1])), self.d_model))
        return ops.reshape(self.dense(flat), x.shape)


class Unregistered(FFNExpert):
    pass


class ChangesShape(FFNExpert):
    def call(self, x, training=None):
        return super().call(x)[..., :-1]


def test_good_expert_passes(tmp_path):
    layer = kvlm.testing.check_expert(FFNExpert, d_model=8, options={"hidden_dim": 6}, tmp_path=tmp_path)
    assert isinstance(layer, FFNExpert) and list(tmp_path.glob("*.keras"))


# Keras warns when it rebuilds a layer without build() from a saved build config.
@pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer")
def test_expert_without_compute_output_shape_passes():
    assert "compute_output_shape" not in vars(ContractOnly)
    layer = kvlm.testing.check_expert(ContractOnly, d_model=8)
    assert isinstance(layer, ContractOnly) and layer.count_params() == 8 * 8 + 8


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="the torch backend infers shapes by running call on filled tensors, so no eager-runnable layer fails it",
)
def test_untraceable_expert_is_told_to_add_compute_output_shape():
    with pytest.raises(AssertionError, match=r"(?s)NeedsConcreteShapes: Keras cannot infer the output shape.*"
                                             r"Add `def compute_output_shape\(self, input_shape\)"):
        kvlm.testing.check_expert(NeedsConcreteShapes, d_model=8)


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (MixesTokens, "must be token-wise"),
        (DeadWeight, "got no gradient"),
        (ForgetsConfig, "rebuilt from its config has weights of shapes"),
        (Unregistered, "is not registered"),
        (ChangesShape, "must keep the input shape"),
    ],
)
def test_bad_experts_fail(cls, message):
    with pytest.raises(AssertionError, match=message):
        kvlm.testing.check_expert(cls, d_model=8, options={"hidden_dim": 6})


def _image(value: int) -> np.ndarray:
    return np.full((32, 32, 3), value, np.uint8)


def good_load(split, size, seed, image_size=32):
    rng = np.random.default_rng([seed, len(split)])
    examples = []
    for _ in range(size):
        color, count = int(rng.integers(3)), int(rng.integers(3))
        image = np.zeros((image_size, image_size, 3), np.uint8)
        image[: count + 1, :, color] = 255
        question, answer = [
            ("what color is the bar", ("red", "green", "blue")[color]),
            ("how many bars", ("one", "two", "three")[count]),
        ][int(rng.integers(2))]
        examples.append(Example(question, answer, f"{answer} bars", image=image, domain="toy"))
    return examples


def test_good_dataset_passes():
    examples = kvlm.testing.check_dataset(good_load, domain="toy", image_size=40)
    assert len(examples) == 200 and examples[0].image.shape == (40, 40, 3)


def _text_only(split, size, seed):
    rng = np.random.default_rng([seed, len(split)])
    return [
        Example(q, a, "c", image=_image(int(rng.integers(255))), domain="toy")
        for q, a in (("what is it", "cat"), ("what color", "red")) * (size // 2)
    ]


def _random(split, size, seed):
    return good_load(split, size, int(np.random.default_rng().integers(1 << 30)))


def _float_images(split, size, seed):
    examples = good_load(split, size, seed)
    for e in examples:
        e.image = e.image.astype("float32")
    return examples


def _one_question(split, size, seed):
    rng = np.random.default_rng([seed, len(split)])
    return [Example("what is it", str(rng.integers(4)), "c", image=_image(1), domain="toy") for _ in range(size)]


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (_text_only, "the question alone predicts the answer"),
        (_random, "not deterministic"),
        (_float_images, "uint8"),
        (_one_question, "disjoint answer sets"),
        (lambda split, size, seed: good_load(split, size - 1, seed), "must return a list of"),
    ],
)
def test_bad_datasets_fail(load, message):
    with pytest.raises(AssertionError, match=message):
        kvlm.testing.check_dataset(load, domain="toy")


def test_wrong_domain_fails():
    with pytest.raises(AssertionError, match="domain must be 'medical'"):
        kvlm.testing.check_dataset(good_load, domain="medical")
