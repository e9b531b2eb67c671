"""Preprocessing shared by the tf.data input pipeline and the exported serving graph."""

from __future__ import annotations

import tensorflow as tf

# RandAugment operations that keep every answer of a VQA example true: no colour
# changes (Invert, Solarize, Color, ...), no flips, nothing that hides objects (Cutout).
SAFE_AUGMENT_OPS = ("Contrast", "Brightness", "Sharpness", "Rotate", "ShearX", "ShearY")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_BYTES = 32


def _number(header: tf.Tensor, start: int, size: int, big_endian: bool) -> tf.Tensor:
    """The unsigned integers in `header[..., start:start + size]` (uint8 bytes), as int64."""
    digits = tf.cast(header[..., start : start + size], tf.int64)
    weights = tf.constant([256**i for i in range(size)][:: -1 if big_endian else 1], tf.int64)
    return tf.reduce_sum(digits * weights, axis=-1)


def _jpeg_sizes(image_bytes: tf.Tensor, is_jpeg: tf.Tensor) -> tf.Tensor:
    """`[n, 2]` (height, width) of the JPEGs among the flat `image_bytes`, zeros elsewhere."""
    jpegs = tf.boolean_mask(image_bytes, is_jpeg)
    sizes = tf.map_fn(
        lambda data: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
        jpegs,
        fn_output_signature=tf.TensorSpec([2], tf.int64),
    )
    indices = tf.where(is_jpeg)
    return tf.scatter_nd(indices, sizes, tf.stack([tf.size(image_bytes, out_type=tf.int64), 2]))


def image_header_size(image_bytes: tf.Tensor) -> tf.Tensor:
    """`[..., 2]` (height, width, int64) read from each PNG, JPEG, GIF or BMP header without
    decoding; `[-1, -1]` for other bytes (the decoder then rejects them).

    Works element-wise on a string tensor of any shape, so a batch is checked with a few
    vectorized ops (only JPEGs, whose size is not at a fixed offset, are parsed one by one).
    """
    flat = tf.reshape(image_bytes, [-1])
    start = tf.strings.substr(flat, 0, _HEADER_BYTES)
    padded = tf.strings.substr(tf.strings.join([start, b"\0" * _HEADER_BYTES]), 0, _HEADER_BYTES)
    header = tf.io.decode_raw(padded, tf.uint8)  # [n, _HEADER_BYTES]

    def signed(start):  # BMP: signed 32-bit little-endian; a negative height means top-down rows
        value = _number(header, start, 4, False)
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    gif_prefix = tf.strings.substr(flat, 0, 6)
    is_jpeg = tf.io.is_jpeg(flat)
    kinds = [  # the first that matches wins
        (tf.equal(tf.strings.substr(flat, 0, 8), _PNG_SIGNATURE),
         tf.stack([_number(header, 20, 4, True), _number(header, 16, 4, True)], axis=-1)),
        (tf.logical_or(tf.equal(gif_prefix, b"GIF87a"), tf.equal(gif_prefix, b"GIF89a")),
         tf.stack([_number(header, 8, 2, False), _number(header, 6, 2, False)], axis=-1)),
        (tf.equal(tf.strings.substr(flat, 0, 2), b"BM"), tf.stack([signed(22), signed(18)], axis=-1)),
        (is_jpeg, _jpeg_sizes(flat, is_jpeg)),
    ]
    sizes = tf.fill(tf.stack([tf.size(flat), 2]), tf.constant(-1, tf.int64))
    for matches, kind_sizes in reversed(kinds):
        sizes = tf.where(matches[:, None], kind_sizes, sizes)
    return tf.reshape(sizes, tf.concat([tf.shape(image_bytes), [2]], axis=0))


def check_image_pixels(image_bytes: tf.Tensor, max_pixels: int) -> tf.Operation:
    """An assertion that every image in `image_bytes` (any shape) has at most `max_pixels`
    (height x width, read from its header): `InvalidArgumentError` before anything is decoded."""
    sizes = image_header_size(image_bytes)
    return tf.debugging.assert_less_equal(
        sizes[..., 0] * sizes[..., 1], tf.constant(max_pixels, tf.int64),
        message=f"The image is larger than {max_pixels} pixels (height x width, read from its header); "
        "it was not decoded",
    )


def decode_image(image_bytes: tf.Tensor, max_pixels: int | None = None) -> tf.Tensor:
    """Decodes PNG/JPEG/GIF/BMP bytes to a uint8 `(H, W, 3)` tensor.

    With `max_pixels`, the size is first read from the image header: a larger image
    raises `InvalidArgumentError` before any memory is allocated for decoding it.
    """
    checks = [check_image_pixels(image_bytes, max_pixels)] if max_pixels else []
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes a uint8 `(..., H, W, 3)` image (or batch) to `(..., image_size, image_size, 3)`
    float32 in [0, 1]. An image already of that size is only rescaled: antialiased resizing
    to the same size returns it unchanged, so the values are the same, without its cost."""
    image = tf.cast(image, tf.float32)
    resized = tf.cond(
        tf.reduce_all(tf.equal(tf.shape(image)[-3:-1], image_size)),
        lambda: image,
        lambda: tf.image.resize(image, (image_size, image_size), antialias=True),
    )
    resized.set_shape(image.shape[:-3].concatenate([image_size, image_size, image.shape[-1]]))
    return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


def make_augmenter(magnitude: float = 3.0, num_layers: int = 1):
    """Returns a function augmenting one uint8 image with tf-models-official's RandAugment."""
    from official.vision.ops import augment

    excluded = [op for op in augment.RandAugment().available_ops if op not in SAFE_AUGMENT_OPS]
    policy = augment.RandAugment(
        num_layers=num_layers, magnitude=magnitude, translate_const=4.0, exclude_ops=excluded
    )

    def augment_image(image: tf.Tensor) -> tf.Tensor:
        return tf.cast(policy.distort(tf.cast(image, tf.uint8)), tf.uint8)

    return augment_image
