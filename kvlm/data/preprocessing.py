"""Preprocessing shared by the tf.data input pipeline and the exported serving graph."""

from __future__ import annotations

import tensorflow as tf

# RandAugment operations that keep every answer of a VQA example true: no colour
# changes (Invert, Solarize, Color, ...), no flips, nothing that hides objects (Cutout).
SAFE_AUGMENT_OPS = ("Contrast", "Brightness", "Sharpness", "Rotate", "ShearX", "ShearY")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_BYTES = 32


def _number(header: tf.Tensor, start: int, size: int, big_endian: bool) -> tf.Tensor:
    """The unsigned integer in `header[start:start + size]` (uint8 bytes), as int64."""
    digits = tf.cast(header[start : start + size], tf.int64)
    weights = tf.constant([256**i for i in range(size)][:: -1 if big_endian else 1], tf.int64)
    return tf.reduce_sum(digits * weights)


def image_header_size(image_bytes: tf.Tensor) -> tf.Tensor:
    """`[height, width]` (int64) read from a PNG, JPEG, GIF or BMP header without decoding;
    `[-1, -1]` for other bytes (the decoder then rejects them)."""
    start = tf.strings.substr(image_bytes, 0, _HEADER_BYTES)
    padded = tf.strings.substr(tf.strings.join([start, b"\0" * _HEADER_BYTES]), 0, _HEADER_BYTES)
    header = tf.io.decode_raw(padded, tf.uint8)

    def png():
        return tf.stack([_number(header, 20, 4, True), _number(header, 16, 4, True)])

    def gif():
        return tf.stack([_number(header, 8, 2, False), _number(header, 6, 2, False)])

    def bmp():  # signed 32-bit little-endian; a negative height means top-down rows
        def signed(start):
            value = _number(header, start, 4, False)
            return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

        return tf.stack([signed(22), signed(18)])

    def jpeg():
        return tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64)

    def unknown():
        return tf.constant([-1, -1], tf.int64)

    gif_prefix = tf.strings.substr(image_bytes, 0, 6)
    return tf.case(
        [
            (tf.equal(tf.strings.substr(image_bytes, 0, 8), _PNG_SIGNATURE), png),
            (tf.logical_or(tf.equal(gif_prefix, b"GIF87a"), tf.equal(gif_prefix, b"GIF89a")), gif),
            (tf.equal(tf.strings.substr(image_bytes, 0, 2), b"BM"), bmp),
            (tf.io.is_jpeg(image_bytes), jpeg),
        ],
        default=unknown,
        exclusive=False,
    )


def decode_image(image_bytes: tf.Tensor, max_pixels: int | None = None) -> tf.Tensor:
    """Decodes PNG/JPEG/GIF/BMP bytes to a uint8 `(H, W, 3)` tensor.

    With `max_pixels`, the size is first read from the image header: a larger image
    raises `InvalidArgumentError` before any memory is allocated for decoding it.
    """
    checks = []
    if max_pixels:
        size = image_header_size(image_bytes)
        checks.append(tf.debugging.assert_less_equal(
            size[0] * size[1], tf.constant(max_pixels, tf.int64),
            message=f"The image is larger than {max_pixels} pixels (height x width, read from its header); "
            "it was not decoded",
        ))
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes a uint8 `(H, W, 3)` image to `(image_size, image_size, 3)` float32 in [0, 1]."""
    image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size), antialias=True)
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


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
