"""Conformance checks for expert plugins, for plugin authors' own test suites.

    import kvlm.testing
    import my_plugin

    def test_plugin(tmp_path):
        kvlm.testing.check_plugin(my_plugin, tmp_path=tmp_path)

Every check raises `AssertionError` naming what failed; they run on whichever Keras
backend is active (`KERAS_BACKEND`).
"""

from __future__ import annotations

import inspect
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
import numpy as np
import pluggy

from kvlm.experts import available, broken, datasets, hookspecs
from kvlm.experts.factory import ensure_built, shipped_path
from kvlm.experts.saving import load_model
from kvlm.experts.spec import DatasetSpec, ExpertSpec


def _fail(message: str) -> None:
    raise AssertionError(message)


def _to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _build(expert: ExpertSpec | Callable[..., Any], d_model: int, options: dict) -> keras.layers.Layer:
    build = expert.build if isinstance(expert, ExpertSpec) else expert
    layer = build(d_model=d_model, **options)
    if not isinstance(layer, keras.layers.Layer):
        _fail(f"build(d_model={d_model}) must return a keras.layers.Layer. Received: {type(layer).__name__}")
    return layer


def _wrap(layer: keras.layers.Layer, tokens: int, d_model: int) -> keras.Model:
    inputs = keras.Input((tokens, d_model))
    return keras.Model(inputs, layer(inputs))


def check_expert(
    expert: ExpertSpec | Callable[..., Any],
    d_model: int = 16,
    options: dict | None = None,
    *,
    batch: int = 2,
    tokens: int = 5,
    capacity: int = 7,
    tmp_path: str | Path | None = None,
    atol: float = 1e-5,
) -> keras.layers.Layer:
    """Checks that an expert fits kvlm's sparse Mixture-of-Experts layer.

    Verifies that the layer maps `(batch, tokens, d_model)` to the same shape (also
    for a symbolic input, as in a functional model; `compute_output_shape` is optional
    when Keras can trace `call`), works token by token on a
    `(capacity, d_model)` slice as the MoE dispatch calls it, round-trips `get_config`
    and Keras serialization (it must be a registered serializable), saves and loads as
    `.keras` with identical outputs, and that every trainable weight gets a gradient.

    Args:
        expert: An `ExpertSpec` or its `build` callable.
        d_model: Token width to build with.
        options: Extra keyword arguments for `build`.
        batch, tokens, capacity: Test input sizes.
        tmp_path: Folder for the `.keras` file (a temporary one by default).
        atol: Tolerance of the numerical comparisons.

    Returns:
        The built layer.
    """
    options = dict(options or {})
    rng = np.random.default_rng(0)
    layer = _build(expert, d_model, options)
    name = type(layer).__name__

    x = rng.normal(size=(batch, tokens, d_model)).astype("float32")
    y = _to_numpy(layer(x))
    if y.shape != x.shape:
        _fail(f"{name} must keep the input shape {x.shape}. Received output shape {y.shape}")
    if not np.all(np.isfinite(y)):
        _fail(f"{name} produced non-finite outputs")
    declared = _symbolic_output_shape(layer, (None, tokens, d_model))
    if declared != (None, tokens, d_model):
        _fail(f"{name} maps a symbolic input of shape (None, {tokens}, {d_model}) to shape {declared}")

    # Token-wise on a dispatch slice: (capacity, d_model), the same outputs as batched.
    flat = x.reshape(-1, d_model)[:capacity]
    sliced = _to_numpy(layer(flat))
    if sliced.shape != flat.shape:
        _fail(f"{name} must accept a (capacity, d_model) slice {flat.shape}. Received output shape {sliced.shape}")
    if not np.allclose(sliced, y.reshape(-1, d_model)[:capacity], atol=atol, rtol=atol):
        _fail(f"{name} must be token-wise: a token's output may not depend on the other tokens or on the batch")

    _check_config(layer, x, y, atol)
    _check_saving(layer, x, y, tokens, d_model, tmp_path, atol)
    _check_gradients(layer, x, tokens, d_model)
    return layer


def _symbolic_output_shape(layer: keras.layers.Layer, shape: tuple) -> tuple:
    """The output shape Keras infers for a symbolic input (from `compute_output_shape`, else by tracing `call`)."""
    try:
        return tuple(layer.compute_output_spec(keras.KerasTensor(shape)).shape)
    except Exception as error:
        _fail(
            f"{type(layer).__name__}: Keras cannot infer the output shape of a symbolic input {shape} "
            f"({type(error).__name__}: {error}). Add `def compute_output_shape(self, input_shape): "
            "return input_shape` and a `build()` that creates the weights, or subclass kvlm.experts.layer.ExpertLayer"
        )


def _check_config(layer: keras.layers.Layer, x: np.ndarray, y: np.ndarray, atol: float) -> None:
    name = type(layer).__name__
    config = layer.get_config()
    clone = type(layer).from_config(config)
    if clone.get_config() != config:
        _fail(f"{name}.from_config(get_config()) changed the config: {config} -> {clone.get_config()}")
    registered = keras.saving.get_registered_name(type(layer))
    if keras.saving.get_registered_object(registered) is not type(layer):
        _fail(f"{name} is not registered; decorate it with @keras.saving.register_keras_serializable(package=...)")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    if type(restored) is not type(layer) or restored.get_config() != config:
        _fail(f"{name} did not survive keras.saving serialize/deserialize")
    ensure_built(restored, x.shape[-1])
    shapes = [tuple(w.shape) for w in restored.weights]
    expected = [tuple(w.shape) for w in layer.weights]
    if shapes != expected:
        _fail(f"{name}: a layer rebuilt from its config has weights of shapes {shapes}, not {expected}")
    restored.set_weights(layer.get_weights())
    if not np.allclose(_to_numpy(restored(x)), y, atol=atol, rtol=atol):
        _fail(f"{name}: a layer rebuilt from its config with the same weights gives different outputs")


def _check_saving(layer, x, y, tokens: int, d_model: int, tmp_path, atol: float) -> None:
    name = type(layer).__name__
    model = _wrap(layer, tokens, d_model)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(tmp_path or scratch) / f"{name.lower()}_conformance.keras"
        model.save(path)
        loaded = load_model(path)
    reloaded = _to_numpy(loaded(x))
    if not np.allclose(reloaded, y, atol=atol, rtol=atol):
        _fail(f"{name}: a model saved as .keras and loaded back gives different outputs")
    inner = [lyr for lyr in loaded.layers if type(lyr) is type(layer)]
    if len(inner) != 1:
        _fail(f"{name}: the loaded .keras model does not contain a {name}")


def _check_gradients(layer: keras.layers.Layer, x: np.ndarray, tokens: int, d_model: int) -> None:
    """One SGD step must change every trainable weight (so each has a non-zero gradient)."""
    name = type(layer).__name__
    if not layer.trainable_weights:
        _fail(f"{name} has no trainable weights")
    model = _wrap(layer, tokens, d_model)
    # Eager JAX compiles op by op, far slower than one jitted step; the others are fast eagerly.
    eager = keras.backend.backend() != "jax"
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="mse", run_eagerly=eager)
    before = [_to_numpy(w).copy() for w in layer.trainable_weights]
    target = np.random.default_rng(1).normal(size=x.shape).astype("float32")
    model.train_on_batch(x, target)
    frozen = [w.path for w, old in zip(layer.trainable_weights, before) if np.array_equal(_to_numpy(w), old)]
    if frozen:
        _fail(f"{name}: these trainable weights got no gradient: {frozen}")


def check_dataset(
    dataset: DatasetSpec | Callable[..., list],
    *,
    domain: str | None = None,
    size: int = 200,
    seed: int = 0,
    image_size: int | None = None,
    max_text_only_accuracy: float = 0.8,
) -> list:
    """Checks a plugin dataset's examples.

    Verifies that `load(split, size, seed)` returns `size` `kvlm.data.Example`s with uint8
    `(H, W, 3)` images, non-empty question, answer and caption and the domain; that it is
    deterministic by seed and differs across seeds and splits; that `image_size=`, when
    accepted, sets the image size; and that answers need both image and text: a
    text-only predictor (the most frequent answer per question, fitted on half the
    examples) must stay below `max_text_only_accuracy` on the other half, and some
    questions must have disjoint answer sets (so the image alone cannot tell the answer).

    Returns:
        The examples loaded with `seed`.
    """
    from kvlm.data.example import Example

    if isinstance(dataset, DatasetSpec):
        load, domain = dataset.load, domain or dataset.domain
    else:
        load = dataset
    accepts_size = "image_size" in inspect.signature(load).parameters
    kwargs = {"image_size": image_size} if image_size is not None and accepts_size else {}
    examples = load("train", size, seed, **kwargs)
    if not isinstance(examples, list) or len(examples) != size:
        _fail(f"load('train', size={size}, seed={seed}) must return a list of {size} examples")
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            _fail(f"example {i} is a {type(example).__name__}, not a kvlm.data.Example")
        image = example.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            _fail(f"example {i}: image must be a uint8 (H, W, 3) array. Received: {getattr(image, 'shape', image)}")
        if image_size is not None and accepts_size and image.shape[:2] != (image_size, image_size):
            _fail(f"example {i}: image_size={image_size} gave an image of shape {image.shape}")
        for field in ("question", "answer", "caption"):
            if not isinstance(getattr(example, field), str) or not getattr(example, field).strip():
                _fail(f"example {i}: `{field}` must be a non-empty string")
        if domain is not None and example.domain != domain:
            _fail(f"example {i}: domain must be {domain!r}. Received: {example.domain!r}")
    _check_determinism(load, examples, size, seed, kwargs)
    _check_needs_image_and_text(examples, max_text_only_accuracy)
    return examples


def _same(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(
        (x.question, x.answer, x.caption) == (y.question, y.answer, y.caption) and np.array_equal(x.image, y.image)
        for x, y in zip(a, b)
    )


def _check_determinism(load, examples, size: int, seed: int, kwargs: dict) -> None:
    if not _same(examples, load("train", size, seed, **kwargs)):
        _fail(f"load('train', {size}, seed={seed}) is not deterministic: two calls returned different examples")
    if size and _same(examples, load("train", size, seed + 1, **kwargs)):
        _fail("different seeds returned the same examples")
    if size and _same(examples, load("test", size, seed, **kwargs)):
        _fail("splits 'train' and 'test' returned the same examples for one seed")


def _check_needs_image_and_text(examples: Sequence, max_text_only_accuracy: float) -> None:
    if len(examples) < 20:
        return
    answers = Counter(e.answer for e in examples)
    if len(answers) < 2:
        _fail(f"all examples have the same answer {next(iter(answers))!r}")
    half = len(examples) // 2
    by_question: dict[str, Counter] = defaultdict(Counter)
    for e in examples[:half]:
        by_question[e.question][e.answer] += 1
    fallback = Counter(e.answer for e in examples[:half]).most_common(1)[0][0]
    predict = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    held_out = examples[half:]
    accuracy = sum(predict.get(e.question, fallback) == e.answer for e in held_out) / len(held_out)
    if accuracy > max_text_only_accuracy:
        _fail(
            f"the question alone predicts the answer with accuracy {accuracy:.2f} > {max_text_only_accuracy}: "
            "answers must depend on the image"
        )
    answer_sets = defaultdict(set)
    for e in examples:
        answer_sets[e.question].add(e.answer)
    frequent = [answer_sets[q] for q, n in Counter(e.question for e in examples).items() if n >= 3]
    if not any(a.isdisjoint(b) for i, a in enumerate(frequent) for b in frequent[i + 1 :]):
        _fail("no two questions have disjoint answer sets: the image alone would tell the answer")


def check_plugin(
    module: ModuleType | object,
    *,
    d_model: int = 16,
    tmp_path: str | Path | None = None,
    dataset_size: int = 200,
    distribution: str | None = None,
) -> dict[str, list]:
    """Registers a plugin module with a fresh pluggy manager, checks that its hooks return
    `ExpertSpec`s / `DatasetSpec`s with unique names, and runs `check_expert` and
    `check_dataset` on each. With `distribution` (its pip name), also checks that the
    installed distribution's entry point provides them to `kvlm.experts.available()` /
    `datasets()` under that name and version.

    Returns `{"experts": [...specs], "datasets": [...specs]}`."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(module)
    unknown = [c.name for c in manager.get_hookcallers(module) or [] if not c.has_spec()]
    if unknown:
        _fail(f"unknown hooks (typos?): {unknown}")
    found: dict[str, list] = {}
    for key, hook, spec_type in (
        ("experts", manager.hook.kvlm_register_experts, ExpertSpec),
        ("datasets", manager.hook.kvlm_register_datasets, DatasetSpec),
    ):
        results = hook()
        for result in results:
            if not isinstance(result, (list, tuple)):
                _fail(f"{hook.name}() must return a list. Received: {type(result).__name__}")
        specs = [spec for result in results for spec in result]
        for spec in specs:
            if not isinstance(spec, spec_type):
                _fail(f"{hook.name}() returned a {type(spec).__name__}, not a kvlm.{spec_type.__name__}")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            _fail(f"{hook.name}() returned duplicate names: {names}")
        found[key] = specs
    if not found["experts"] and not found["datasets"]:
        _fail("the plugin registers no experts and no datasets; are its hooks marked with @kvlm.hookimpl?")
    if distribution is not None:
        _check_discovered(found, distribution)
    for spec in found["experts"]:
        check_expert(spec, d_model=d_model, tmp_path=tmp_path)
        if spec.trained is not None:
            check_trained(spec)
    for spec in found["datasets"]:
        check_dataset(spec, size=dataset_size)
    return found


def check_trained(spec: ExpertSpec) -> None:
    """Checks that the trained expert `spec.trained` ships (loads; an adapter expert with one key of
    the routing feature and a finite threshold, and, with a question key, finite image and
    question thresholds; an FFN expert with one key per fusion block plus
    the head's; weights of matching widths) under the spec's name and domain."""
    import numpy as np

    from kvlm.domain_experts import DomainExpert

    path = shipped_path(spec, spec.trained)
    try:
        expert = DomainExpert.load(path)
    except (OSError, KeyError, ValueError) as error:
        _fail(f"{spec.name}: the trained expert at {path} does not load ({type(error).__name__}: {error}); "
              "ship the folder `kvlm train --task domain_expert` writes as package data")
    if (expert.name, expert.domain) != (spec.name, spec.domain):
        _fail(f"{spec.name}: {path} holds the expert {expert.name!r} ({expert.domain}), not {spec.name!r} ({spec.domain})")
    d_model = expert.answer_kernel.shape[0]
    if expert.kind == "adapters":
        if expert.keys.shape[0] != 1 or expert.threshold is None or not np.isfinite(expert.threshold):
            _fail(f"{spec.name}: {path} is an adapter expert with {expert.keys.shape[0]} router keys and threshold "
                  f"{expert.threshold} (expected one key and a finite threshold)")
        gates = (expert.image_threshold, expert.question_threshold)
        if expert.question_key is not None and (None in gates or not np.all(np.isfinite(gates))
                                                or expert.question_key.ndim != 1 or not np.all(expert.question_key < 0)):
            _fail(f"{spec.name}: {path} has a question key of shape {expert.question_key.shape} with image and question "
                  f"thresholds {gates} (expected log-probabilities over its vocabulary and two finite thresholds)")
    elif expert.keys.shape[0] != len(expert.ffn_weights) + 1 or any(
            w[0].shape[0] != d_model or expert.keys.shape[-1] != d_model for w in expert.ffn_weights):
        _fail(f"{spec.name}: {path} has {expert.keys.shape[0]} router keys for {len(expert.ffn_weights)} fusion blocks "
              f"(expected one per block plus the head's, all of width {d_model})")
    if expert.word_embeddings.shape != (len(expert.words), d_model) or expert.answer_kernel.shape != (d_model, len(expert.answers)):
        _fail(f"{spec.name}: {path} has embedding rows or answer columns that do not match its words and answers")


def _check_discovered(found: dict[str, list], distribution: str) -> None:
    version = metadata.version(distribution)
    for key, discovered in (("experts", available()), ("datasets", datasets())):
        for spec in found[key]:
            info = discovered.get(spec.name)
            if info is None or (info.distribution, info.version) != (distribution, version):
                reasons = [str(r) for r in broken() if r.distribution == distribution]
                _fail(
                    f"{spec.name!r} is not discovered from {distribution} {version}: "
                    f"found {info and (info.distribution, info.version)}. Declare the module under "
                    f"[project.entry-points.kvlm] and reinstall. Broken: {reasons or 'none'}"
                )
