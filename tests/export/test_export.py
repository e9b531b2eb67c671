"""`kvlm.export`: TF Serving layout, warm-up requests, and a SavedModel that runs with
plain TensorFlow + tf-text in a fresh process and matches `model.predict`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kvlm.data import decode_image, resize_image
from kvlm.export import SIGNATURE_NAME, export_model, next_version, validate_model_name, version_dirs
from kvlm.runs import load_run

# Runs in a fresh interpreter where kvlm, keras, keras_hub, jax and torch cannot be imported:
# only TensorFlow and tensorflow-text's op libraries are loaded.
FRESH_PROCESS = r"""
import json, sys
BLOCKED = ("kvlm", "keras", "keras_hub", "jax", "torch")
for name in BLOCKED:
    sys.modules[name] = None
try:
    import kvlm
    kvlm_importable = True
except ImportError:
    kvlm_importable = False
import importlib.util, pathlib
import numpy as np
import tensorflow as tf
# tensorflow_text's kernels, as the TF Serving binary links them. (`import tensorflow_text`
# would pull in Keras through tf.keras, so load its op libraries directly.)
text_package = pathlib.Path(importlib.util.find_spec("tensorflow_text").submodule_search_locations[0])
for library in sorted((text_package / "python").glob("*/_*.so")):
    tf.load_op_library(str(library))

version_dir, batches_file = sys.argv[1], sys.argv[2]
batches = json.load(open(batches_file))
model = tf.saved_model.load(version_dir)
serve = model.signatures["serving_default"]
result = {"kvlm_importable": kvlm_importable, "batches": [], "errors": {}}
for batch in batches:
    images = [bytes.fromhex(h) for h in batch["images"]]
    outputs = serve(image_bytes=tf.constant(images), text=tf.constant(batch["texts"]))
    result["batches"].append({
        "answer": [a.decode() for a in outputs["answer"].numpy()],
        "score": outputs["score"].numpy().tolist(),
        "scores": outputs["scores"].numpy().tolist(),
        "labels": [[l.decode() for l in row] for row in outputs["labels"].numpy()],
    })
png = bytes.fromhex(batches[0]["images"][0])
cases = {
    "empty_image": ([b""], ["what?"]),
    "corrupt_image": ([b"not an image at all"], ["what?"]),
    "truncated_png": ([png[:40]], ["what?"]),
    "batch_mismatch": ([png, png], ["what?"]),
}
for name, (images, texts) in cases.items():
    try:
        serve(image_bytes=tf.constant(images), text=tf.constant(texts))
        result["errors"][name] = "no error"
    except tf.errors.InvalidArgumentError as error:
        result["errors"][name] = "InvalidArgumentError: " + error.message[:300]
    except Exception as error:
        result["errors"][name] = f"{type(error).__name__}: {error}"[:300]
result["loaded"] = sorted(
    m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None
)
print(json.dumps(result))
"""


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _batches() -> list[dict]:
    from kvlm.data import shapes

    examples = shapes.generate(9, seed=11, image_size=32)
    rng = np.random.default_rng(2)
    same_size = [_encode(e.image, "PNG") for e in examples[:5]]
    mixed = [
        _encode(examples[5].image, "JPEG"),
        _encode(rng.integers(0, 256, (48, 20, 3), dtype=np.uint8), "PNG"),
        _encode(np.kron(examples[6].image, np.ones((3, 3, 1), np.uint8)), "BMP"),
        _encode(examples[7].image, "GIF"),
    ]
    texts = [e.question for e in examples]
    return [
        {"images": same_size, "texts": texts[:5]},
        {"images": mixed, "texts": [t.upper() + "  " for t in texts[5:9]]},
    ]


def _reference(run_dir, batch: dict) -> tuple[np.ndarray, list[str]]:
    """`model.predict` on inputs preprocessed by kvlm's own functions, as in training."""
    run = load_run(run_dir)
    model, tokenizer, answers = run.model, run.tokenizer, run.answers
    size = model.backbone.image_size
    images = np.stack([resize_image(decode_image(b), size).numpy() for b in batch["images"]])
    # The tf.data path, exactly as `kvlm.data.make_dataset` tokenizes.
    token_ids = next(iter(tf.data.Dataset.from_tensors(tf.constant(batch["texts"])).map(tokenizer))).numpy()
    logits = model.predict({"images": images, "token_ids": token_ids.astype("int32")}, verbose=0)
    scores = keras.ops.convert_to_numpy(keras.ops.softmax(keras.ops.convert_to_tensor(logits), axis=-1))
    return scores, [answers[i] for i in scores.argmax(-1)]


def test_layout_and_warmup(tiny_export):
    from tensorflow_serving.apis import prediction_log_pb2

    run_dir, version_dir = tiny_export
    assert version_dir.name == "1" and version_dir.parent.name == "kvlm"
    assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()
    assert version_dirs(version_dir.parent) == {1: version_dir}
    assert next_version(version_dir.parent) == 2
    assert not [p for p in version_dir.parent.iterdir() if p.name.startswith(".tmp")]

    records = list(tf.data.TFRecordDataset(str(version_dir / "assets.extra" / "tf_serving_warmup_requests")))
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]
    assert [len(log.predict_log.request.inputs["image_bytes"].string_val) for log in logs] == [1, 8]
    request = logs[0].predict_log.request
    assert request.model_spec.signature_name == SIGNATURE_NAME
    assert set(request.inputs) == {"image_bytes", "text"}
    metadata = json.loads((version_dir / "assets.extra" / "kvlm.json").read_text())
    assert metadata["answers"] == load_run(run_dir).answers
    assert metadata["keras_backend"] == keras.backend.backend()


def test_export_refuses_bad_names_and_existing_versions(tiny_export, tmp_path):
    run_dir, version_dir = tiny_export
    for name in ("../x", "/etc", "a/b", "..", "", ".hidden"):
        with pytest.raises(ValueError, match="Invalid model name"):
            export_model(run_dir, base_path=tmp_path, name=name)
        with pytest.raises(ValueError, match="not a path"):
            validate_model_name(name)
    with pytest.raises(ValueError, match="already exists"):
        export_model(run_dir, base_path=version_dir.parents[1], name="kvlm", version=1)
    with pytest.raises(ValueError, match="positive integer"):
        export_model(run_dir, base_path=tmp_path, version=0)
    with pytest.raises(FileNotFoundError, match="model.keras"):
        export_model(tmp_path / "no_run", base_path=tmp_path)
    assert not (tmp_path / "kvlm").exists() or not any((tmp_path / "kvlm").iterdir())


def test_fresh_process_matches_model_predict(tiny_export, tmp_path):
    """Only TensorFlow + tf-text kernels load the export; answers and scores match predict."""
    run_dir, version_dir = tiny_export
    batches = _batches()
    batches_file = tmp_path / "batches.json"
    batches_file.write_text(json.dumps([
        {"images": [b.hex() for b in batch["images"]], "texts": batch["texts"]} for batch in batches
    ]))
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    process = subprocess.run(
        [sys.executable, str(script), str(version_dir), str(batches_file)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])

    assert result["kvlm_importable"] is False
    assert result["loaded"] == []
    answers = load_run(run_dir).answers
    for batch, served in zip(batches, result["batches"]):
        scores, expected_answers = _reference(run_dir, batch)
        np.testing.assert_allclose(np.array(served["scores"]), scores, atol=1e-5)
        np.testing.assert_allclose(np.array(served["score"]), scores.max(-1), atol=1e-5)
        assert served["answer"] == expected_answers
        assert served["labels"] == [answers] * len(batch["images"])
    errors = result["errors"]
    assert "Input is empty" in errors["empty_image"]
    assert "Unknown image file format" in errors["corrupt_image"]
    assert errors["truncated_png"].startswith("InvalidArgumentError")
    assert "must have the same batch size" in errors["batch_mismatch"]


def test_embedded_server_runs_the_export_as_the_restored_signature(tiny_export):
    """`kvlm serve` runs signatures as session callables on the restored graph (as TF Serving does):
    on this backend's export they give the restored `serving_default`'s outputs."""
    from kvlm.export.testing import example_requests
    from kvlm.serving.models import LoadedVersion

    _, version_dir = tiny_export
    image_size = json.loads((version_dir / "assets.extra" / "kvlm.json").read_text())["image_size"]
    images, texts = example_requests(5, image_size=image_size)
    expected = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_NAME](
        image_bytes=tf.constant(images), text=tf.constant(texts)
    )
    loaded = LoadedVersion("kvlm", 1, version_dir)
    try:
        served = loaded.signature(SIGNATURE_NAME).run(
            {"image_bytes": np.array(images, dtype=object), "text": np.array(texts, dtype=object)}
        )
    finally:
        loaded.close()
    assert set(served) == set(expected) == {"answer", "score", "scores", "labels"}
    assert served["answer"].tolist() == expected["answer"].numpy().tolist()
    assert served["labels"].tolist() == expected["labels"].numpy().tolist()
    np.testing.assert_allclose(served["scores"], expected["scores"].numpy(), atol=1e-6)
    assert served["scores"].shape == (5, len(served["labels"][0]))


@pytest.mark.skipif(keras.backend.backend() in ("tensorflow", "jax"), reason="export works on this backend")
def test_other_backends_are_refused_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match="KERAS_BACKEND=tensorflow"):
        export_model(tmp_path / "run", base_path=tmp_path)
