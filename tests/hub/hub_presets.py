"""Tiny keras-hub vision backbones of each supported family, saved as preset folders."""

from __future__ import annotations

from pathlib import Path

import keras_hub

SIZE = 32


def vit():
    return keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), patch_size=8, num_layers=1, num_heads=2,
                                        hidden_dim=16, mlp_dim=32)


def clip():
    vision = keras_hub.models.CLIPVisionEncoder(patch_size=8, hidden_dim=16, num_layers=1, num_heads=2,
                                                intermediate_dim=32, image_shape=(SIZE, SIZE, 3))
    text = keras_hub.models.CLIPTextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1,
                                            num_heads=2, intermediate_dim=32, max_sequence_length=8)
    return keras_hub.models.CLIPBackbone(vision, text, projection_dim=16)


def siglip():
    vision = keras_hub.models.SigLIPVisionEncoder(patch_size=8, hidden_dim=16, num_layers=1, num_heads=2,
                                                  intermediate_dim=32, image_shape=(SIZE, SIZE, 3))
    text = keras_hub.models.SigLIPTextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1,
                                              num_heads=2, intermediate_dim=32, max_sequence_length=8)
    return keras_hub.models.SigLIPBackbone(vision, text)


def dinov2():
    return keras_hub.models.DINOV2Backbone(patch_size=8, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
                                           image_shape=(SIZE, SIZE, 3), position_embedding_shape=(SIZE, SIZE, 3))


def resnet():
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=(None, None, 3),
    )


# family: (builder, its converter class, tokens out of a 32-px image, the tower's own width)
FAMILIES = {
    "vit": (vit, keras_hub.layers.ViTImageConverter, 17, 16),  # class token + 4x4 patches
    "clip": (clip, keras_hub.layers.CLIPImageConverter, 17, 16),
    "siglip": (siglip, keras_hub.layers.SigLIPImageConverter, 16, 16),  # the tokens its pooling head reads
    "dinov2": (dinov2, keras_hub.layers.DINOV2ImageConverter, 17, 16),
    "resnet": (resnet, keras_hub.layers.ResNetImageConverter, 16, 64),  # a 4x4 feature map, row by row
}
SCALE, OFFSET = [1 / 58.4, 1 / 57.1, 1 / 57.4], [-2.1, -2.0, -1.8]


def save_preset(family: str, folder: Path) -> tuple[str, object]:
    """`(folder, backbone)`: a tiny `family` backbone and its image converter saved to `folder`
    with keras-hub's `save_to_preset`."""
    build, converter, _, _ = FAMILIES[family]
    backbone = build()
    backbone.save_to_preset(str(folder))
    converter(image_size=(SIZE, SIZE), scale=SCALE, offset=OFFSET).save_to_preset(str(folder))
    return str(folder), backbone
