import keras
import numpy as np
import pytest
from harness import run_task_test

from kvlm.data import answer_vocabulary, make_dataset
from kvlm.models import VLMClassifier
from kvlm.models.distiller import Distiller
from kvlm.training.tracing import build_before_tracing

pytestmark = pytest.mark.long

NUM_CLASSES = 5
VOCABULARY_SIZE = 60
# A small dense student beside the MoE `kvlm_tiny` teacher.
STUDENT = dict(hidden_dim=32, num_heads=2, intermediate_dim=64, cnn_filters=16, num_fusion_layers=2)


def make_teacher(num_classes=NUM_CLASSES, vocabulary_size=VOCABULARY_SIZE):
    return VLMClassifier.from_preset(
        "kvlm_tiny", num_classes=num_classes, vocabulary_size=vocabulary_size, encoder="cnn",
        moe={"experts": 4, "top_k": 2},
    )


def make_student(num_classes=NUM_CLASSES, vocabulary_size=VOCABULARY_SIZE):
    return VLMClassifier.from_preset(
        "kvlm_tiny", num_classes=num_classes, vocabulary_size=vocabulary_size, encoder="cnn", **STUDENT
    )


def accuracy():
    return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def numpy_loss(labels, student, teacher, alpha, temperature, weights=None):
    weights = np.ones(len(labels)) if weights is None else weights
    task = -log_softmax(student)[np.arange(len(labels)), labels]
    log_t, log_s = log_softmax(teacher / temperature), log_softmax(student / temperature)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(axis=-1)
    n = len(labels)
    return alpha * (weights * task).sum() / n + (1 - alpha) * temperature**2 * (weights * kl).sum() / n


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_matches_numpy(alpha, tiny_inputs):
    teacher, student = make_teacher(), make_student()
    distiller = Distiller(teacher, student)
    distiller.compile(optimizer="adam", alpha=alpha, temperature=2.5)
    rng = np.random.default_rng(0)
    student_logits = rng.normal(0.0, 2.0, (3, NUM_CLASSES)).astype("float32")
    labels = np.array([0, 3, 4], dtype="int32")
    teacher_logits = keras.ops.convert_to_numpy(teacher(tiny_inputs, training=False)).astype("float64")
    loss = distiller.compute_loss(tiny_inputs, labels, keras.ops.convert_to_tensor(student_logits), training=False)
    expected = numpy_loss(labels, student_logits.astype("float64"), teacher_logits, alpha, 2.5)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(loss)), expected, rtol=1e-5, atol=1e-6)
    weights = np.array([1.0, 0.0, 2.0], dtype="float32")
    weighted = distiller.compute_loss(
        tiny_inputs, labels, keras.ops.convert_to_tensor(student_logits), sample_weight=weights, training=False
    )
    expected = numpy_loss(labels, student_logits.astype("float64"), teacher_logits, alpha, 2.5, weights)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(weighted)), expected, rtol=1e-5, atol=1e-6)


def test_call_is_the_student_and_validation(tiny_inputs):
    teacher, student = make_teacher(), make_student()
    distiller = Distiller(teacher, student)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(distiller(tiny_inputs)), keras.ops.convert_to_numpy(student(tiny_inputs)),
        rtol=1e-6, atol=1e-6,
    )
    assert not teacher.trainable and not teacher.trainable_weights
    assert len(distiller.trainable_weights) == len(student.trainable_weights)
    with pytest.raises(ValueError, match="alpha=1.5"):
        distiller.compile(optimizer="adam", alpha=1.5)
    with pytest.raises(ValueError, match="temperature=0.0"):
        distiller.compile(optimizer="adam", temperature=0.0)
    with pytest.raises(ValueError, match="different models"):
        Distiller(student, student)


@pytest.mark.convergence
def test_fit_trains_only_the_student_and_lowers_the_loss(shapes_examples, vocabulary, tokenizer):
    examples = shapes_examples[:32]
    answers = answer_vocabulary(shapes_examples)
    data = make_dataset(examples, tokenizer, answers, 32, 16)
    num_classes, vocabulary_size = len(answers), len(vocabulary)
    teacher = make_teacher(num_classes, vocabulary_size)
    student = make_student(num_classes, vocabulary_size)
    teacher_before = [keras.ops.convert_to_numpy(w).copy() for w in teacher.weights if "moe" not in w.path]
    student_before = [keras.ops.convert_to_numpy(w).copy() for w in student.trainable_weights]
    distiller = Distiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=[accuracy()], alpha=0.5, temperature=2.0)
    build_before_tracing(distiller, data.element_spec)
    history = distiller.fit(data, epochs=5, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    assert "accuracy" in history.history
    teacher_after = [keras.ops.convert_to_numpy(w) for w in teacher.weights if "moe" not in w.path]
    for before, after in zip(teacher_before, teacher_after):
        np.testing.assert_array_equal(before, after)
    # The teacher's router and experts are frozen too (its routing statistics may change).
    moe = teacher.backbone.get_layer("fusion_block_1").ffn
    assert not moe.trainable_weights
    assert any(
        not np.array_equal(before, keras.ops.convert_to_numpy(after))
        for before, after in zip(student_before, student.trainable_weights)
    )
    # evaluate scores the student: its accuracy equals the student's own on the same batches.
    metrics = distiller.evaluate(data, return_dict=True, verbose=0)
    hits = [
        np.argmax(keras.ops.convert_to_numpy(student(x, training=False)), axis=-1) == keras.ops.convert_to_numpy(y)
        for x, y in data
    ]
    assert metrics["accuracy"] == pytest.approx(np.concatenate(hits).mean(), abs=1e-6)


def test_config_task_fit_and_keras_file(tmp_path, tiny_inputs):
    distiller = Distiller(make_teacher(), make_student(), name="distiller")
    config = distiller.get_config()
    clone = Distiller.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.student, VLMClassifier) and isinstance(clone.teacher, VLMClassifier)
    assert clone.teacher.backbone.moe == {"experts": 4, "top_k": 2}
    assert not clone.teacher.trainable
    assert clone.count_params() == distiller.count_params()

    compile_kwargs = {
        "optimizer": keras.optimizers.Adam(3e-3), "metrics": [accuracy()], "alpha": 0.3, "temperature": 4.0,
    }
    labels = np.array([0, 3, 4], "int32")
    loaded = run_task_test(
        distiller, tiny_inputs, labels, expected_output_shape=(3, NUM_CLASSES), tmp_path=tmp_path,
        compile_kwargs=compile_kwargs, atol=1e-6,
    )
    assert (loaded.alpha, loaded.temperature) == (0.3, 4.0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.teacher(tiny_inputs)),
        keras.ops.convert_to_numpy(distiller.teacher(tiny_inputs)), rtol=1e-5, atol=1e-6,
    )
    # The student alone is a plain classifier.
    student_path = tmp_path / "student.keras"
    distiller.student.save(student_path)
    student = keras.saving.load_model(student_path)
    assert type(student) is VLMClassifier
    np.testing.assert_allclose(
        student.predict(tiny_inputs, verbose=0), distiller.predict(tiny_inputs, verbose=0), rtol=1e-5, atol=1e-6
    )
