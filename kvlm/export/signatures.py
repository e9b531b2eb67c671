"""The `serving_default` signature: raw image bytes + question text -> answer.

Inputs (both `[batch]`, one entry per example):
    image_bytes: tf.string, PNG/JPEG/GIF/BMP bytes of any size.
    text: tf.string, the question.

Outputs:
    answer: tf.string `[batch]`, the most likely answer label.
    score: tf.float32 `[batch]`, the softmax probability of `answer`.
    scores: tf.float32 `[batch, num_answers]`, softmax over every answer.
    labels: tf.string `[batch, num_answers]`, the answer label of each column of
        `scores` (the same row repeated: every output keeps the batch dimension,
        which TF Serving's batching requires).

A model with adapter experts installed (`kvlm.domain_experts.AdapterExperts`) also returns, per
example, `expert` (tf.string: the expert that answered, `base` when no expert took it) and
`expert_weight` (tf.float32: its routing posterior among the experts that admitted the example;
1 for the base), and has a `choose_experts` signature: the same inputs plus `experts` (tf.string
`[batch]`, each a comma-separated list of the experts its example may use; empty: the base only).
An unknown expert name raises `InvalidArgumentError` naming the experts that exist. Its
`routed_logits` signature is `logits` with `allowed` (bool `[batch, experts]`) and the routing.

Decoding, resizing and tokenization use `kvlm.data.decode_image`, `resize_image`
and the keras-hub WordPiece tokenizer (tf-text ops), the same functions as the
training input pipeline. A corrupt or empty image, an image above
`MAX_IMAGE_PIXELS` (read from its header before decoding, so that the official
TF Serving binary is protected too), or inputs whose batch sizes differ, make the
graph raise `InvalidArgumentError` (gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from kvlm.data.preprocessing import check_image_pixels, decode_image, resize_image
from kvlm.export.names import (  # noqa: F401  (re-exported: the contract's names)
    BASE_EXPERT,
    CAPTION_FEATURES_SIGNATURE_NAME,
    CAPTION_INPUT_NAMES,
    CAPTION_OUTPUT_NAMES,
    CAPTION_SIGNATURE_NAME,
    CHOOSE_EXPERTS_SIGNATURE_NAME,
    EMBED_FEATURES_SIGNATURE_NAME,
    EMBED_OUTPUT_NAMES,
    EMBED_SIGNATURE_NAME,
    EXPERTS_INPUT,
    EXPERT_OUTPUT_NAMES,
    FEATURES_SIGNATURE_NAME,
    IMAGE_INPUT,
    INPUT_NAMES,
    OUTPUT_NAMES,
    ROUTED_FEATURES_SIGNATURE_NAME,
    SIGNATURE_NAME,
    TEXT_INPUT,
)

# The largest image (height x width) the serving graph decodes: 4096 x 4096 is 64 MiB as RGBA.
MAX_IMAGE_PIXELS = 4096 * 4096


def preprocess_images(image_bytes: tf.Tensor, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> tf.Tensor:
    """Decodes and resizes a `[batch]` string tensor to `(batch, S, S, 3)` float32 in [0, 1].

    The whole batch is first checked against `max_pixels` from the image headers
    (`check_image_pixels`); then each image is decoded on its own (`decode_image`). When
    all decoded images have the same size, which is the usual case, `resize_image` runs
    once on the stacked batch (it resizes every image independently, so the values are
    the same as one by one, and it is several times faster than resizing inside the loop);
    otherwise each image is resized on its own.
    """
    with tf.control_dependencies([check_image_pixels(image_bytes, max_pixels)]):
        image_bytes = tf.identity(image_bytes)

    def decode_flat(data):
        image = decode_image(data)
        # `* 1` turns the shape into a plain int32 tensor, as the loop's TensorList expects.
        return tf.reshape(image, [-1]), tf.shape(image) * 1

    flat, shapes = tf.map_fn(
        decode_flat,
        image_bytes,
        fn_output_signature=(tf.RaggedTensorSpec([None], tf.uint8, ragged_rank=0), tf.TensorSpec([3], tf.int32)),
    )
    batch = tf.shape(image_bytes)[0]
    output = tf.TensorSpec((image_size, image_size, 3), tf.float32)

    def resize_stacked():
        images = tf.reshape(flat.flat_values, tf.concat([[batch], tf.reduce_max(shapes, axis=0)], axis=0))
        return resize_image(images, image_size)

    def resize_each():
        return tf.map_fn(
            lambda i: resize_image(tf.reshape(flat[i], shapes[i]), image_size),
            tf.range(batch),
            fn_output_signature=output,
        )

    same_size = tf.logical_and(batch > 0, tf.reduce_all(tf.equal(shapes, shapes[:1])))
    images = tf.cond(same_size, resize_stacked, resize_each)
    return tf.ensure_shape(images, (None, image_size, image_size, 3))


def preprocess_inputs(image_bytes: tf.Tensor, text: tf.Tensor, tokenizer, image_size: int):
    """`(images, token_ids)` from the serving inputs, after checking their batch sizes agree."""
    check = tf.debugging.assert_equal(
        tf.shape(image_bytes)[0], tf.shape(text)[0],
        message=f"inputs '{IMAGE_INPUT}' and '{TEXT_INPUT}' must have the same batch size",
    )
    with tf.control_dependencies([check]):
        images = preprocess_images(image_bytes, image_size)
        token_ids = tf.cast(tokenizer(text), tf.int32)
    return images, token_ids


def _answers(logits: tf.Tensor, labels: tf.Tensor, batch: tf.Tensor) -> dict[str, tf.Tensor]:
    """`answer`, `score`, `scores` and `labels` of `(batch, num_answers)` logits."""
    scores = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    best = tf.argmax(scores, axis=-1, output_type=tf.int32)
    return {
        "answer": tf.gather(labels, best),
        "score": tf.gather(scores, best, batch_dims=1),
        "scores": scores,
        "labels": tf.tile(labels[tf.newaxis, :], tf.stack([batch, 1])),
    }


_RAW_INPUTS = [tf.TensorSpec([None], tf.string, name=IMAGE_INPUT), tf.TensorSpec([None], tf.string, name=TEXT_INPUT)]


def make_serving_function(
    logits_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    tokenizer,
    answers: Sequence[str],
    image_size: int,
) -> tf.types.experimental.GenericFunction:
    """Builds the traced `serving_default` function around `logits_fn(images, token_ids)`.

    `logits_fn` is a `tf.function` (for the JAX backend, the jax2tf-converted model)
    returning `(batch, num_answers)` logits.
    """
    labels = tf.constant(list(answers), dtype=tf.string)

    @tf.function(input_signature=_RAW_INPUTS, autograph=False)
    def serve(image_bytes, text):
        images, token_ids = preprocess_inputs(image_bytes, text, tokenizer, image_size)
        return _answers(logits_fn(images, token_ids), labels, tf.shape(image_bytes)[0])

    serve.get_concrete_function()
    return serve


def allowed_experts(experts: tf.Tensor, names: Sequence[str]) -> tf.Tensor:
    """Bool `(batch, len(names))`: which of the experts `names` each example may use, from its
    comma-separated `experts` string (spaces around names ignored; empty: none of them).
    An unknown name raises `InvalidArgumentError` listing the experts."""
    known = tf.constant(list(names), dtype=tf.string)
    given = tf.strings.strip(tf.strings.split(experts, ","))
    matches = tf.equal(tf.expand_dims(given.flat_values, -1), known[tf.newaxis, :])
    valid = tf.logical_or(tf.reduce_any(matches, axis=-1), tf.equal(given.flat_values, ""))
    unknown = tf.boolean_mask(given.flat_values, tf.logical_not(valid))
    check = tf.debugging.Assert(
        tf.reduce_all(valid),
        [f"Unknown expert name(s) in {EXPERTS_INPUT}; the experts are {', '.join(names)} (an empty string: the "
         f"{BASE_EXPERT} only). Received:", unknown],
    )
    with tf.control_dependencies([check]):
        return tf.reduce_any(tf.RaggedTensor.from_row_splits(matches, given.row_splits), axis=1)


def make_expert_serving_functions(
    routed_fn: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]],
    tokenizer,
    answers: Sequence[str],
    image_size: int,
    experts: Sequence[str],
) -> tuple[tf.types.experimental.GenericFunction, tf.types.experimental.GenericFunction]:
    """`(serving_default, choose_experts)` of a model with adapter experts, around
    `routed_fn(images, token_ids, allowed) -> (logits, slots, weights)` (slot 0: the base)."""
    labels = tf.constant(list(answers), dtype=tf.string)
    slot_names = tf.constant([BASE_EXPERT, *experts], dtype=tf.string)

    def run(image_bytes, text, allowed):
        images, token_ids = preprocess_inputs(image_bytes, text, tokenizer, image_size)
        logits, slots, weights = routed_fn(images, token_ids, allowed)
        outputs = _answers(logits, labels, tf.shape(image_bytes)[0])
        outputs.update(expert=tf.gather(slot_names, tf.cast(slots, tf.int32)), expert_weight=tf.cast(weights, tf.float32))
        return outputs

    @tf.function(input_signature=_RAW_INPUTS, autograph=False)
    def serve(image_bytes, text):
        return run(image_bytes, text, tf.ones(tf.stack([tf.shape(image_bytes)[0], len(experts)]), tf.bool))

    @tf.function(input_signature=[*_RAW_INPUTS, tf.TensorSpec([None], tf.string, name=EXPERTS_INPUT)],
                 autograph=False)
    def choose(image_bytes, text, experts_input):
        with tf.control_dependencies([tf.debugging.assert_equal(
                tf.shape(experts_input)[0], tf.shape(image_bytes)[0],
                message=f"'{EXPERTS_INPUT}' must have one entry per example")]):
            return run(image_bytes, text, allowed_experts(experts_input, experts))

    serve.get_concrete_function()
    choose.get_concrete_function()
    return serve, choose


def make_embed_function(
    embed_fn: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    tokenizer,
    image_size: int,
) -> tf.types.experimental.GenericFunction:
    """Builds the traced `embed` function around `embed_fn(images, token_ids)`.

    `embed_fn` is a `tf.function` (for the JAX backend, the jax2tf-converted model)
    returning `(image_embedding, text_embedding)`, each `(batch, embedding_dim)`.
    The inputs and their preprocessing are those of `serving_default`.
    """

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name=IMAGE_INPUT),
            tf.TensorSpec([None], tf.string, name=TEXT_INPUT),
        ],
        autograph=False,
    )
    def embed(image_bytes, text):
        images, token_ids = preprocess_inputs(image_bytes, text, tokenizer, image_size)
        image_embedding, text_embedding = embed_fn(images, token_ids)
        return {
            "image_embedding": tf.cast(image_embedding, tf.float32),
            "text_embedding": tf.cast(text_embedding, tf.float32),
        }

    embed.get_concrete_function()
    return embed


def make_caption_function(
    token_ids_fn: Callable[[tf.Tensor], tf.Tensor],
    tokenizer,
    image_size: int,
    start_token_id: int,
    end_token_id: int,
) -> tf.types.experimental.GenericFunction:
    """Builds the traced `caption` function around `token_ids_fn(images)`.

    `token_ids_fn` is a `tf.function` returning the generated int32 `(batch, length)` ids
    (start token, caption tokens, end token, padding). The input is `image_bytes`
    (`string[batch]`, preprocessed as in `serving_default`); the output `caption`
    (`string[batch]`) holds the tokens between the start and the first end token, joined
    by the WordPiece detokenizer (tf-text).
    """
    from kvlm.models.captioning import decode_captions

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_INPUT)], autograph=False)
    def caption(image_bytes):
        images = preprocess_images(image_bytes, image_size)
        token_ids = token_ids_fn(images)
        return {"caption": decode_captions(token_ids, tokenizer, start_token_id, end_token_id)}

    caption.get_concrete_function()
    return caption
