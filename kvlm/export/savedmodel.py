"""Writes a trained run as a TF Serving SavedModel with in-graph preprocessing.

Backends:
    tensorflow: the Keras model is traced into the graph directly.
    jax: `keras.export.ExportArchive` converts the model with `jax2tf` (native
        serialization). The model then lives in one `XlaCallModule` op holding
        StableHLO; the preprocessing around it stays plain TF + tf-text ops. A
        server needs a TensorFlow runtime whose `XlaCallModule` kernel accepts the
        serialization version written by the installed JAX and has an XLA compiler
        for its device (TF / TF Serving 2.20 does for CPU; a GPU server also needs
        the model lowered for CUDA: pass `platforms=("cpu", "cuda")`).
    torch: not supported; the `.keras` file is backend-independent, so export it
        with `KERAS_BACKEND=tensorflow` (or `jax`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

from kvlm.export.layout import next_version, validate_model_name
from kvlm.export.signatures import (
    CAPTION_FEATURES_SIGNATURE_NAME,
    CAPTION_INPUT_NAMES,
    CAPTION_OUTPUT_NAMES,
    CAPTION_SIGNATURE_NAME,
    CHOOSE_EXPERTS_SIGNATURE_NAME,
    EMBED_FEATURES_SIGNATURE_NAME,
    EMBED_OUTPUT_NAMES,
    EMBED_SIGNATURE_NAME,
    EXPERT_OUTPUT_NAMES,
    EXPERTS_INPUT,
    FEATURES_SIGNATURE_NAME,
    INPUT_NAMES,
    OUTPUT_NAMES,
    ROUTED_FEATURES_SIGNATURE_NAME,
    SIGNATURE_NAME,
    TEXT_INPUT,
    make_caption_function,
    make_embed_function,
    make_expert_serving_functions,
    make_serving_function,
)
from kvlm.export.warmup import WARMUP_DIR, write_warmup_requests
from kvlm.models.classifier import classifier_sizes
from kvlm.runs import load_run
from kvlm.tasks import get_task

EXPORT_BACKENDS = ("tensorflow", "jax")
METADATA_FILE = "kvlm.json"


def _check_backend() -> str:
    backend = keras.backend.backend()
    if backend not in EXPORT_BACKENDS:
        raise ValueError(
            f"SavedModel export needs the TensorFlow or JAX backend, not {backend!r}. "
            "The .keras file is backend-independent: run the export with KERAS_BACKEND=tensorflow."
        )
    return backend


def write_saved_model(
    model: keras.Model,
    tokenizer,
    answers: Sequence[str],
    path: str | Path,
    model_name: str = "kvlm",
    platforms: Sequence[str] | None = None,
) -> Path:
    """Writes `model` (a `VLMClassifier` or `RetrievalAugmentedVLM`) with preprocessing as a SavedModel at `path`.

    A `RetrievalAugmentedVLM` carries its knowledge index in its variables, so the
    SavedModel answers with retrieval and needs nothing else. A `DualEncoder` is written by
    `write_dual_encoder_saved_model` and a `Captioner` by `write_captioner_saved_model`;
    `export_model` picks the writer of the run's task.

    Args:
        model: The classifier: its backbone (or, for a functional model without one, its
            inputs) gives image size and sequence length.
        tokenizer: The keras-hub tokenizer used in training.
        answers: Label of each logit.
        path: Folder to create (must not exist).
        model_name: Model name written into the warm-up requests.
        platforms: JAX only: devices to lower for, e.g. `("cpu", "cuda")`
            (default: the device JAX runs on).
    """
    backend = _check_backend()
    image_size, sequence_length, num_classes = classifier_sizes(model)
    if len(answers) != num_classes:
        raise ValueError(f"{len(answers)} answers for a model with {num_classes} outputs.")
    archive = keras.export.ExportArchive()
    archive.track(model)

    def logits(images, token_ids):
        return model({"images": images, "token_ids": token_ids}, training=False)

    features = [
        tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="images"),
        tf.TensorSpec((None, sequence_length), tf.int32, name="token_ids"),
    ]
    logits_fn = archive.add_endpoint(FEATURES_SIGNATURE_NAME, logits, input_signature=features,
                                     **_jax2tf_kwargs(backend, platforms))
    metadata = {"signature": SIGNATURE_NAME, "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES)}
    experts = _adapter_experts(model)
    if experts is None:
        archive.add_endpoint(SIGNATURE_NAME, make_serving_function(logits_fn, tokenizer, answers, image_size))
    else:
        def routed(images, token_ids, allowed):
            return experts.answer({"images": images, "token_ids": token_ids}, allowed)

        routed_fn = archive.add_endpoint(
            ROUTED_FEATURES_SIGNATURE_NAME, routed,
            input_signature=[*features, tf.TensorSpec((None, len(experts.experts)), tf.bool, name="allowed")],
            **_jax2tf_kwargs(backend, platforms),
        )
        serve, choose = make_expert_serving_functions(routed_fn, tokenizer, answers, image_size, experts.experts)
        archive.add_endpoint(SIGNATURE_NAME, serve)
        archive.add_endpoint(CHOOSE_EXPERTS_SIGNATURE_NAME, choose)
        metadata["outputs"] += list(EXPERT_OUTPUT_NAMES)
        metadata["experts"] = list(experts.experts)
        metadata["choose_experts"] = {"signature": CHOOSE_EXPERTS_SIGNATURE_NAME, "input": EXPERTS_INPUT}
    archive.write_out(str(path), verbose=False)

    return _finish_export(path, model_name, image_size, metadata | {
        "answers": list(answers),
        "image_size": image_size,
        "sequence_length": sequence_length,
        "keras_backend": backend,
    })


def _adapter_experts(model: keras.Model):
    """The model's `AdapterExperts` layer (adapter experts installed), or None."""
    from kvlm.domain_experts.multi_adapter import AdapterExperts

    return next((layer for layer in model.layers if isinstance(layer, AdapterExperts)), None)


def _finish_export(path: str | Path, model_name: str, image_size: int, metadata: dict) -> Path:
    """Writes the warm-up requests (with text when the signature takes it) and `kvlm.json`
    beside a written SavedModel; returns its folder."""
    write_warmup_requests(path, model_name, image_size, with_text=TEXT_INPUT in metadata["inputs"])
    (Path(path) / WARMUP_DIR / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return Path(path)


def _jax2tf_kwargs(backend: str, platforms: Sequence[str] | None) -> dict:
    if backend != "jax":
        return {}
    # Serving needs no gradients; without them the SavedModel has no custom-gradient functions.
    kwargs = {"with_gradient": False}
    if platforms:
        kwargs["native_serialization_platforms"] = tuple(platforms)
    return {"jax2tf_kwargs": kwargs}


def write_dual_encoder_saved_model(
    model: keras.Model,
    tokenizer,
    path: str | Path,
    model_name: str = "kvlm",
    platforms: Sequence[str] | None = None,
) -> Path:
    """Writes a `DualEncoder` with preprocessing as a SavedModel at `path`.

    Signatures `embed` and `serving_default` (the same function) take `image_bytes` and
    `text` (`string[batch]`) and return `image_embedding` and `text_embedding`
    (float32 `[batch, embedding_dim]`, unit norm); see `kvlm.export.signatures`.
    Arguments as for `write_saved_model`.
    """
    backend = _check_backend()
    image_size = model.image_size
    archive = keras.export.ExportArchive()
    archive.track(model)

    def embeddings(images, token_ids):
        outputs = model({"images": images, "token_ids": token_ids}, training=False)
        return outputs["image_embedding"], outputs["text_embedding"]

    embeddings_fn = archive.add_endpoint(
        EMBED_FEATURES_SIGNATURE_NAME,
        embeddings,
        input_signature=[
            tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="images"),
            tf.TensorSpec((None, model.sequence_length), tf.int32, name="token_ids"),
        ],
        **_jax2tf_kwargs(backend, platforms),
    )
    archive.add_endpoint(EMBED_SIGNATURE_NAME, make_embed_function(embeddings_fn, tokenizer, image_size))
    archive.add_endpoint(SIGNATURE_NAME, make_embed_function(embeddings_fn, tokenizer, image_size))
    archive.write_out(str(path), verbose=False)

    return _finish_export(path, model_name, image_size, {
        "signature": SIGNATURE_NAME,
        "signatures": [SIGNATURE_NAME, EMBED_SIGNATURE_NAME],
        "inputs": list(INPUT_NAMES),
        "outputs": list(EMBED_OUTPUT_NAMES),
        "embedding_dim": model.embedding_dim,
        "image_size": image_size,
        "sequence_length": model.sequence_length,
        "keras_backend": backend,
    })


def write_captioner_saved_model(
    model: keras.Model,
    tokenizer,
    path: str | Path,
    model_name: str = "kvlm",
    platforms: Sequence[str] | None = None,
) -> Path:
    """Writes a `Captioner` with preprocessing and greedy decoding as a SavedModel at `path`.

    Signatures `caption` and `serving_default` (the same function) take `image_bytes`
    (`string[batch]`) and return `caption` (`string[batch]`): the image is decoded and
    resized in the graph, the caption is decoded greedily in a `tf.while_loop` (the keras-hub
    `GreedySampler`, as `model.generate(..., sampler="greedy")`) and detokenized with the
    WordPiece detokenizer. `caption_token_ids` maps float images to the generated ids.
    The warm-up requests send `image_bytes` only. Arguments as for `write_saved_model`;
    TensorFlow backend only (the sampling loop is traced as TensorFlow ops).
    """
    from kvlm.models.captioning import check_caption_tokens

    backend = _check_backend()
    if backend != "tensorflow":
        raise ValueError(
            f"Captioner export needs the TensorFlow backend, not {backend!r}. "
            "The .keras file is backend-independent: run the export with KERAS_BACKEND=tensorflow."
        )
    del platforms  # JAX only
    check_caption_tokens(model, tokenizer)
    image_size = model.image_size
    archive = keras.export.ExportArchive()
    archive.track(model)

    def token_ids(images):
        return model.generate_token_ids(images, sampler="greedy")

    token_ids_fn = archive.add_endpoint(
        CAPTION_FEATURES_SIGNATURE_NAME,
        token_ids,
        input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="images")],
    )
    caption = make_caption_function(
        token_ids_fn, tokenizer, image_size, model.start_token_id, model.end_token_id
    )
    archive.add_endpoint(CAPTION_SIGNATURE_NAME, caption)
    archive.add_endpoint(SIGNATURE_NAME, caption)
    archive.write_out(str(path), verbose=False)

    return _finish_export(path, model_name, image_size, {
        "signature": SIGNATURE_NAME,
        "signatures": [SIGNATURE_NAME, CAPTION_SIGNATURE_NAME],
        "inputs": list(CAPTION_INPUT_NAMES),
        "outputs": list(CAPTION_OUTPUT_NAMES),
        "image_size": image_size,
        "sequence_length": model.sequence_length,
        "keras_backend": backend,
    })


def export_model(
    run_dir: str | Path,
    base_path: str | Path = "saved_models",
    name: str = "kvlm",
    version: int | None = None,
    platforms: Sequence[str] | None = None,
) -> Path:
    """Exports a run folder to `<base_path>/<name>/<version>/`; returns that folder.

    `version` defaults to one more than the highest existing version. The SavedModel
    is written to a hidden temporary folder and renamed into place, so a polling
    server never sees a half-written version. The run's task writes its signatures
    (`kvlm.tasks.base.Task.export`).
    """
    validate_model_name(name)
    _check_backend()
    model_dir = Path(base_path) / name
    if version is None:
        version = next_version(model_dir)
    elif not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"`version` must be a positive integer. Received: version={version!r}")
    target = model_dir / str(version)
    if target.exists():
        raise ValueError(f"{target} already exists: choose another version or leave `version` unset.")
    run = load_run(run_dir)
    task = get_task(run.config.task)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        task.export(run, staging, model_name=name, platforms=platforms)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
