"""Backbones, task models and presets."""

from kvlm.models.backbone import VLMBackbone
from kvlm.models.captioner import CaptionDecoder, Captioner
from kvlm.models.classifier import VLMClassifier
from kvlm.models.contrastive import CLIPLoss, ContrastiveLogits, SigLIPLoss
from kvlm.models.distiller import DistillationKL, Distiller
from kvlm.models.dual_encoder import DualEncoder
from kvlm.models.flops import count_parameters, forward_flops, model_profile
from kvlm.models.knowledge import KnowledgeIndex, build_index, query_embeddings
from kvlm.models.preprocessor import VLMPreprocessor
from kvlm.models.presets import PRESETS, get_preset
from kvlm.models.rag import RetrievalAugmentedVLM, RetrievalReader

__all__ = [
    "CLIPLoss",
    "CaptionDecoder",
    "Captioner",
    "ContrastiveLogits",
    "DistillationKL",
    "Distiller",
    "DualEncoder",
    "KnowledgeIndex",
    "PRESETS",
    "RetrievalAugmentedVLM",
    "RetrievalReader",
    "SigLIPLoss",
    "VLMBackbone",
    "VLMClassifier",
    "VLMPreprocessor",
    "build_index",
    "count_parameters",
    "forward_flops",
    "get_preset",
    "model_profile",
    "query_embeddings",
]
