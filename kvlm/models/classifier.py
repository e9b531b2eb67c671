"""Classification / visual question answering task model."""

from __future__ import annotations

from typing import Any

import keras

from kvlm.models.backbone import VLMBackbone


@keras.saving.register_keras_serializable(package="kvlm")
class VLMClassifier(keras.Model):
    """Image + question -> answer logits over `num_classes` answers.

    A plain functional `keras.Model` taking `{"images", "token_ids"}`: compile, fit,
    evaluate, predict and `.keras` saving work as for any Keras model.

    Args:
        backbone: A `VLMBackbone`.
        num_classes: Number of answers.
        dropout: Dropout before the answer head.

    Example:
        >>> model = VLMClassifier.from_preset("kvlm_tiny", num_classes=17, vocabulary_size=100)
    """

    def __init__(self, backbone: VLMBackbone, num_classes: int, dropout: float = 0.0, **kwargs):
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2. Received: num_classes={num_classes}")
        inputs = backbone.input
        pooled = backbone(inputs)["pooled_output"]
        x = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
        logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout = dropout

    @classmethod
    def from_preset(
        cls, preset: str, num_classes: int, vocabulary_size: int, dropout: float = 0.0, **overrides
    ) -> "VLMClassifier":
        """Builds a classifier on a preset backbone; `overrides` go to the backbone."""
        backbone = VLMBackbone.from_preset(preset, vocabulary_size=vocabulary_size, **overrides)
        return cls(backbone, num_classes=num_classes, dropout=dropout)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
