"""Backbones, task models and presets."""

from kvlm.models.backbone import VLMBackbone
from kvlm.models.classifier import VLMClassifier
from kvlm.models.contrastive import CLIPLoss, ContrastiveLogits, SigLIPLoss
from kvlm.models.dual_encoder import DualEncoder
from kvlm.models.presets import PRESETS, get_preset

__all__ = [
    "CLIPLoss",
    "ContrastiveLogits",
    "DualEncoder",
    "PRESETS",
    "SigLIPLoss",
    "VLMBackbone",
    "VLMClassifier",
    "get_preset",
]
