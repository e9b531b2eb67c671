import keras
import numpy as np
import pytest
from harness import run_task_test

from kvlm.layers import ViTEncoder
from kvlm.models import PRESETS, VLMBackbone, VLMClassifier, get_preset


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_classifier_shapes_and_parameter_count(encoder, tiny_inputs):
    model = VLMClassifier.from_preset("kvlm_tiny", num_classes=7, vocabulary_size=60, encoder=encoder)
    logits = keras.ops.convert_to_numpy(model(tiny_inputs))
    assert logits.shape == (3, 7)
    assert np.isfinite(logits).all()
    # Parameter counts of the tiny presets; a change here is a change of architecture.
    assert model.count_params() == {"vit": 186_695, "cnn": 199_367}[encoder]


def test_backbone_outputs(tiny_inputs):
    backbone = VLMBackbone.from_preset("kvlm_tiny", vocabulary_size=60)
    out = backbone(tiny_inputs)
    assert tuple(out["sequence_output"].shape) == (3, 1 + 16 + 16, 64)
    assert tuple(out["pooled_output"].shape) == (3, 64)
    mask = keras.ops.convert_to_numpy(out["padding_mask"])
    np.testing.assert_array_equal(mask[:, 17:], tiny_inputs["token_ids"] != 0)
    assert mask[:, :17].all()


def test_task_shapes_fit_and_keras_file(tmp_path, tiny_inputs):
    model = VLMClassifier.from_preset("kvlm_tiny", num_classes=5, vocabulary_size=60, encoder="vit")
    loaded = run_task_test(
        model, tiny_inputs, np.array([0, 3, 4], "int32"), expected_output_shape=(3, 5), tmp_path=tmp_path,
        compile_kwargs={
            "optimizer": keras.optimizers.Adam(3e-3),
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        },
    )
    assert isinstance(loaded.backbone.get_layer("image_encoder"), ViTEncoder)


# The default suite's VQA learning check is tests/training/test_learning.py, through the product loop.
@pytest.mark.slow
def test_fit_lowers_loss_and_callbacks_run(tiny_inputs, tmp_path):
    model = VLMClassifier.from_preset("kvlm_tiny", num_classes=3, vocabulary_size=60, encoder="cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    labels = np.array([0, 1, 2], dtype="int32")
    checkpoint = tmp_path / "best.keras"
    history = model.fit(
        tiny_inputs,
        labels,
        epochs=15,
        batch_size=3,
        verbose=0,
        callbacks=[keras.callbacks.ModelCheckpoint(checkpoint, monitor="loss", save_best_only=True)],
    )
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert checkpoint.exists()
    assert model.evaluate(tiny_inputs, labels, verbose=0, return_dict=True)["accuracy"] == 1.0


def test_presets_and_errors():
    assert set(PRESETS) == {"kvlm_tiny", "kvlm_small", "kvlm_base"}
    with pytest.raises(ValueError, match="kvlm_huge"):
        get_preset("kvlm_huge")
    with pytest.raises(ValueError, match="encoder='rnn'"):
        VLMBackbone(vocabulary_size=10, encoder="rnn")
    with pytest.raises(ValueError, match="num_classes=1"):
        VLMClassifier.from_preset("kvlm_tiny", num_classes=1, vocabulary_size=10)
