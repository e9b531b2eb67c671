import json

import numpy as np
import pytest
import tensorflow as tf

from kvlm.data import (
    AnnotationError,
    answer_vocabulary,
    load_folder,
    load_vocabulary,
    make_augmenter,
    make_dataset,
    make_tokenizer,
    save_vocabulary,
)

pytestmark = pytest.mark.backend_independent


def test_batches_have_model_inputs(shapes_examples, tokenizer):
    answers = answer_vocabulary(shapes_examples)
    dataset = make_dataset(shapes_examples[:40], tokenizer, answers, image_size=32, batch_size=16)
    features, labels = next(iter(dataset))
    assert features["images"].shape == (16, 32, 32, 3) and features["images"].dtype == tf.float32
    assert features["token_ids"].shape == (16, 16) and features["token_ids"].dtype == tf.int32
    assert float(tf.reduce_max(features["images"])) <= 1.0
    # The pipeline tokenizes exactly like the tokenizer on its own.
    expected = tokenizer([e.question for e in shapes_examples[:16]])
    np.testing.assert_array_equal(features["token_ids"].numpy(), np.asarray(expected))
    np.testing.assert_array_equal(
        labels.numpy(), [answers.index(e.answer) for e in shapes_examples[:16]]
    )
    np.testing.assert_allclose(features["images"][0].numpy() * 255, shapes_examples[0].image, atol=0.51)
    assert sum(int(b[1].shape[0]) for b in dataset) == 40


def test_unknown_answer_is_named(shapes_examples, tokenizer):
    with pytest.raises(ValueError, match="Answers not in the label set"):
        make_dataset(shapes_examples, tokenizer, ["yes", "no"], image_size=32)


def test_vocabulary_round_trip_and_padding(vocabulary, tmp_path):
    assert vocabulary[0] == "[PAD]"
    assert {"red", "circle", "where"} <= set(vocabulary)
    save_vocabulary(vocabulary, tmp_path)
    assert load_vocabulary(tmp_path) == vocabulary
    ids = np.asarray(make_tokenizer(vocabulary, 8)(["What color is the circle?"]))[0]
    assert (ids[:6] > 0).all() and (ids[6:] == 0).all()
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        make_tokenizer(["a", "[PAD]"], 8)


def test_augmentation_changes_pixels_not_shape(shapes_examples):
    augment = make_augmenter(magnitude=5.0, num_layers=2)
    tf.random.set_seed(0)
    image = tf.constant(shapes_examples[0].image)
    outputs = [augment(image) for _ in range(4)]
    assert all(o.shape == image.shape and o.dtype == tf.uint8 for o in outputs)
    assert any(int(tf.reduce_sum(tf.abs(tf.cast(o, tf.int32) - tf.cast(image, tf.int32)))) > 0 for o in outputs)


def _write_folder(tmp_path, examples, lines=None):
    for i, e in enumerate(examples):
        tf.io.write_file(str(tmp_path / f"img{i}.png"), tf.io.encode_png(e.image))
    if lines is None:
        lines = [
            json.dumps({"image": f"img{i}.png", "question": e.question, "answer": e.answer, "caption": e.caption})
            for i, e in enumerate(examples)
        ]
    (tmp_path / "annotations.jsonl").write_text("\n".join(lines) + "\n")


def test_folder_loader_feeds_the_same_pipeline(tmp_path, shapes_examples, tokenizer):
    examples = shapes_examples[:6]
    _write_folder(tmp_path, examples)
    loaded = load_folder(tmp_path)
    assert [e.question for e in loaded] == [e.question for e in examples]
    answers = answer_vocabulary(shapes_examples)
    from_files = next(iter(make_dataset(loaded, tokenizer, answers, 32, batch_size=6)))
    in_memory = next(iter(make_dataset(examples, tokenizer, answers, 32, batch_size=6)))
    np.testing.assert_allclose(from_files[0]["images"].numpy(), in_memory[0]["images"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(from_files[1].numpy(), in_memory[1].numpy())


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"annotations.jsonl:2: invalid JSON"),
        ('{"image": "img0.png", "question": "q"}', r"annotations.jsonl:2: missing key\(s\) \['answer'\]"),
        ('{"image": "img0.png", "question": 3, "answer": "a"}', r"annotations.jsonl:2: 'question' must be a string"),
        ('[1, 2]', r"annotations.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_annotation_names_file_and_line(tmp_path, shapes_examples, bad_line, message):
    good = json.dumps({"image": "img0.png", "question": "q", "answer": "a"})
    _write_folder(tmp_path, shapes_examples[:1], [good, bad_line])
    with pytest.raises(AnnotationError, match=message):
        load_folder(tmp_path)


def test_missing_image_names_file_and_line(tmp_path, shapes_examples):
    good = json.dumps({"image": "img0.png", "question": "q", "answer": "a"})
    missing = json.dumps({"image": "nope.png", "question": "q", "answer": "a"})
    _write_folder(tmp_path, shapes_examples[:1], [good, good, missing])
    with pytest.raises(FileNotFoundError, match=r"annotations.jsonl:3: image not found: .*nope.png"):
        load_folder(tmp_path)


def test_resize_image_keeps_an_image_of_the_target_size_and_resizes_others():
    from kvlm.data import resize_image

    pixels = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3)).astype(np.uint8)
    # Same size: the pixels scaled to [0, 1], exactly what antialiased resizing returns.
    square = pixels[:, :40]
    np.testing.assert_array_equal(resize_image(tf.constant(square), 40).numpy(), square / np.float32(255.0))
    reference = tf.image.resize(tf.cast(square, tf.float32), (40, 40), antialias=True) / 255.0
    np.testing.assert_array_equal(resize_image(tf.constant(square), 40).numpy(), reference.numpy())
    # Another size: every image of a batch resized on its own.
    resized = resize_image(tf.constant(pixels), 32).numpy()
    assert resized.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(resized[1], resize_image(tf.constant(pixels[1]), 32).numpy(), atol=1e-6)
    assert not np.allclose(resized[0], resized[1])
    # The output shape is static even when the input's is not.
    traced = tf.function(lambda x: resize_image(x, 32)).get_concrete_function(tf.TensorSpec([None, None, None, 3], tf.uint8))
    assert traced.output_shapes.as_list() == [None, 32, 32, 3]
