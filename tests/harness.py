"""The task-model test harness (after keras-hub's `run_task_test` / `run_model_saving_test`).

`run_task_test` checks a task model end to end on a small batch: the forward pass has the
expected output shapes and finite values, a few `fit` epochs lower the loss, and the trained
model survives the `.keras` round trip (`run_model_saving_test`) with identical outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kvlm.training.tracing import build_before_tracing


def _normalised(config: dict[str, Any]) -> Any:
    """A config as it reads back from `config.json` (tuples become lists)."""
    return json.loads(json.dumps(config, default=str))


def _numpy(structure) -> Any:
    return keras.tree.map_structure(lambda x: np.asarray(keras.ops.convert_to_numpy(x)), structure)


def _assert_same(actual, expected, atol: float) -> None:
    actual, expected = keras.tree.flatten(_numpy(actual)), keras.tree.flatten(_numpy(expected))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0.0, atol=atol)


def caption_split(train_size: int, held_out_size: int, sequence_length: int):
    """`(train, held_out, vocabulary, tokenizer)`: procedural examples (seeds 11 and 12) and a
    caption vocabulary with its tokenizer, for the tests that train on captions."""
    from kvlm.data import build_vocabulary, make_tokenizer, shapes

    train = shapes.generate(train_size, seed=11)
    held_out = shapes.generate(held_out_size, seed=12)
    vocabulary = build_vocabulary([e.caption for e in train], 200)
    return train, held_out, vocabulary, make_tokenizer(vocabulary, sequence_length)


def run_model_saving_test(model: keras.Model, inputs, path: str | Path, atol: float = 0.0) -> keras.Model:
    """Saves `model` to the `.keras` file `path`, loads it and returns the loaded model.

    Checks that the loaded model has the same class and config, the same weights, the same
    optimizer state (when compiled) and the same outputs on `inputs` (to `atol`; default exact).
    """
    expected = model.predict(inputs, verbose=0)
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    assert _normalised(loaded.get_config()) == _normalised(model.get_config())
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    _assert_same(loaded.get_weights(), model.get_weights(), atol=0.0)
    if getattr(model, "optimizer", None) is not None:
        _assert_same(loaded.optimizer.variables, model.optimizer.variables, atol=0.0)
    _assert_same(loaded.predict(inputs, verbose=0), expected, atol)
    return loaded


def run_task_test(
    model: keras.Model,
    x,
    y=None,
    *,
    expected_output_shape,
    tmp_path: Path,
    compile_kwargs: dict[str, Any] | None = None,
    epochs: int = 5,
    max_loss_ratio: float = 0.9,
    atol: float = 0.0,
) -> keras.Model:
    """Checks a task model on one batch `(x, y)` and returns it reloaded from `.keras`.

    Args:
        model: The task model; compiled here with `compile_kwargs` (default Adam, 3e-3). Only
            JAX compiles the train step, since its eager mode compiles every op on its own; on
            TensorFlow (XLA) and PyTorch (torch.compile) compiling costs more than the few steps.
        x, y: One batch of inputs and targets (`y=None` for models that find their own).
        expected_output_shape: The shape of `model.predict(x)`, or a dict of shapes.
        tmp_path: Folder for the `.keras` file.
        epochs: `fit` epochs on the batch; the last loss must be below `max_loss_ratio`
            times the first.
        atol: Tolerance of the reloaded model's outputs.
    """
    outputs = _numpy(model.predict(x, verbose=0))
    assert keras.tree.map_structure(lambda a: tuple(a.shape), outputs) == expected_output_shape
    assert all(np.isfinite(a).all() for a in keras.tree.flatten(outputs))

    jit_compile = keras.backend.backend() == "jax"
    model.compile(**{"optimizer": keras.optimizers.Adam(3e-3), "jit_compile": jit_compile, **(compile_kwargs or {})})
    batch_size = len(keras.tree.flatten(x)[0])
    build_before_tracing(model, (x, y))
    losses = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0).history["loss"]
    assert losses[-1] < max_loss_ratio * losses[0], losses

    return run_model_saving_test(model, x, Path(tmp_path) / f"{model.name}.keras", atol=atol)


# Loads a SavedModel where kvlm, Keras, keras-hub, JAX and PyTorch cannot be imported, as a
# TF Serving process would, and answers the requests in argv[2] (JSON).
_SERVE_WITHOUT_KVLM = r"""
import importlib.util, json, pathlib, sys
for name in ("kvlm", "keras", "keras_hub", "jax", "torch"):
    sys.modules[name] = None
import tensorflow as tf
text = pathlib.Path(importlib.util.find_spec("tensorflow_text").submodule_search_locations[0])
for library in sorted((text / "python").glob("*/_*.so")):
    tf.load_op_library(str(library))
model = tf.saved_model.load(sys.argv[1])
variables = sorted({v.name.split(":")[0].split("/")[-1] for v in model.variables})
answers = []
for request in json.load(open(sys.argv[2])):
    inputs = dict(image_bytes=tf.constant([bytes.fromhex(h) for h in request["images"]]),
                  text=tf.constant(request["texts"]))
    try:
        if request["experts"] is None:
            outputs = model.signatures["serving_default"](**inputs)
        else:
            outputs = model.signatures["choose_experts"](**inputs, experts=tf.constant(request["experts"]))
    except tf.errors.InvalidArgumentError as error:
        answers.append({"error": error.message})
        continue
    answer = {"scores": outputs["scores"].numpy().tolist(), "answers": [a.decode() for a in outputs["answer"].numpy()],
              "variables": variables}
    if "expert" in outputs:
        answer.update(experts=[e.decode() for e in outputs["expert"].numpy()],
                      expert_weights=outputs["expert_weight"].numpy().tolist())
    answers.append(answer)
print(json.dumps(answers))
"""


def serve_without_kvlm(version_dir: str | Path, images: list[bytes], texts: list[str], workdir: Path,
                       experts: list[str] | None = None) -> dict[str, Any]:
    """A VQA SavedModel's `serving_default` answers (its `choose_experts` answers, given `experts`)
    in a process that cannot import kvlm or Keras: `{"scores", "answers", "variables"}` (variable
    names without scopes), and `"experts"`, `"expert_weights"` for a model with experts installed;
    `{"error"}` for a request the graph refuses."""
    return serve_many_without_kvlm(version_dir, [(images, texts, experts)], workdir)[0]


def serve_many_without_kvlm(version_dir: str | Path, requests: list[tuple], workdir: Path) -> list[dict[str, Any]]:
    """`serve_without_kvlm` of each `(images, texts, experts)` request, in one process."""
    path = Path(workdir) / "requests.json"
    path.write_text(json.dumps([{"images": [i.hex() for i in images], "texts": list(texts), "experts": experts}
                                for images, texts, experts in requests]))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.run([sys.executable, "-c", _SERVE_WITHOUT_KVLM, str(version_dir), str(path)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])
