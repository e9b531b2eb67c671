"""keras-hub backbones as kvlm's encoders, loaded from a preset handle (Kaggle, Hugging Face or a
local folder) or built in place."""

from kvlm.hub.image_encoder import HubImageEncoder, preset_image_size, token_model, vision_backbone

__all__ = ["HubImageEncoder", "preset_image_size", "token_model", "vision_backbone"]
