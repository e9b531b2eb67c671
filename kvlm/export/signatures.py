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

SIGNATURE_NAME = "serving_default"
FEATURES_SIGNATURE_NAME = "logits"
IMAGE_INPUT = "image_bytes"
TEXT_INPUT = "text"
INPUT_NAMES = (IMAGE_INPUT, TEXT_INPUT)
OUTPUT_NAMES = ("answer", "score", "scores", "labels")
# A `DualEncoder` export: `embed` (also its `serving_default`) maps the same inputs to
# unit-norm float32 `[batch, embedding_dim]` embeddings of each image and each text.
EMBED_SIGNATURE_NAME = "embed"
EMBED_FEATURES_SIGNATURE_NAME = "embeddings"
EMBED_OUTPUT_NAMES = ("image_embedding", "text_embedding")
# A `Captioner` export: `caption` (also its `serving_default`) maps `image_bytes` alone to
# greedy-decoded caption strings.
CAPTION_SIGNATURE_NAME = "caption"
CAPTION_FEATURES_SIGNATURE_NAME = "caption_token_ids"
CAPTION_INPUT_NAMES = (IMAGE_INPUT,)
CAPTION_OUTPUT_NAMES = ("caption",)
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

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name=IMAGE_INPUT),
            tf.TensorSpec([None], tf.string, name=TEXT_INPUT),
        ],
        autograph=False,
    )
    def serve(image_bytes, text):
        batch = tf.shape(image_bytes)[0]
        images, token_ids = preprocess_inputs(image_bytes, text, tokenizer, image_size)
        logits = tf.cast(logits_fn(images, token_ids), tf.float32)
        scores = tf.nn.softmax(logits, axis=-1)
        best = tf.argmax(scores, axis=-1, output_type=tf.int32)
        return {
            "answer": tf.gather(labels, best),
            "score": tf.gather(scores, best, batch_dims=1),
            "scores": scores,
            "labels": tf.tile(labels[tf.newaxis, :], tf.stack([batch, 1])),
        }

    serve.get_concrete_function()
    return serve


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
