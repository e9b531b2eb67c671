"""Backend-agnostic Keras layers (keras.ops only)."""

from kvlm.layers.cnn_encoder import CNNEncoder, ResidualConvBlock
from kvlm.layers.fusion import FeedForward, FusionBlock, ModalityFusion
from kvlm.layers.moe import SparseMoE
from kvlm.layers.patch_embedding import PatchEmbedding
from kvlm.layers.text_encoder import TextEncoder
from kvlm.layers.vit_encoder import ViTEncoder

__all__ = [
    "CNNEncoder",
    "FeedForward",
    "FusionBlock",
    "ModalityFusion",
    "PatchEmbedding",
    "ResidualConvBlock",
    "SparseMoE",
    "TextEncoder",
    "ViTEncoder",
]
