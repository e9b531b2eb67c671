"""Preprocessing shared by the tf.data input pipeline and the exported serving graph."""

from __future__ import annotations

import tensorflow as tf

# RandAugment operations that keep every answer of a VQA example true: no colour
# changes (Invert, Solarize, Color, ...), no flips, nothing that hides objects (Cutout).
SAFE_AUGMENT_OPS = ("Contrast", "Brightness", "Sharpness", "Rotate", "ShearX", "ShearY")


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decodes PNG/JPEG/GIF/BMP bytes to a uint8 `(H, W, 3)` tensor."""
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
