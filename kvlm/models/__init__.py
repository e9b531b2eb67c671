"""Backbones, task models and presets."""

from kvlm.models.backbone import VLMBackbone
from kvlm.models.classifier import VLMClassifier
from kvlm.models.presets import PRESETS, get_preset

__all__ = ["PRESETS", "VLMBackbone", "VLMClassifier", "get_preset"]
