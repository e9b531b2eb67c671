"""Architecture presets: sizes of the encoders and fusion stack."""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "kvlm_tiny": dict(
        image_size=32, patch_size=8, cnn_filters=32, cnn_stages=2, sequence_length=16,
        hidden_dim=64, num_heads=4, intermediate_dim=128,
        num_image_layers=1, num_text_layers=1, num_fusion_layers=3, dropout=0.0,
    ),
    "kvlm_small": dict(
        image_size=64, patch_size=8, cnn_filters=64, cnn_stages=3, sequence_length=32,
        hidden_dim=192, num_heads=6, intermediate_dim=768,
        num_image_layers=4, num_text_layers=2, num_fusion_layers=4, dropout=0.1,
    ),
    "kvlm_base": dict(
        image_size=224, patch_size=16, cnn_filters=128, cnn_stages=4, sequence_length=64,
        hidden_dim=768, num_heads=12, intermediate_dim=3072,
        num_image_layers=12, num_text_layers=6, num_fusion_layers=6, dropout=0.1,
    ),
}


def get_preset(name: str) -> dict[str, Any]:
    """Returns a copy of the named preset's backbone arguments."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. Available presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
