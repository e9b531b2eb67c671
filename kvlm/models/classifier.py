"""Classification / visual question answering task model."""

from __future__ import annotations

import keras

from kvlm.models.backbone import VLMBackbone
from kvlm.models import preset_dir
from kvlm.models.composite import Composite
from kvlm.models.preprocessor import VLMPreprocessor, check_preprocessor


@keras.saving.register_keras_serializable(package="kvlm")
class VLMClassifier(Composite, keras.Model):
    """Image + question -> answer logits over `num_classes` answers.

    A plain functional `keras.Model` taking `{"images", "token_ids"}`: compile, fit,
    evaluate, predict and `.keras` saving work as for any Keras model.

    Args:
        backbone: A `VLMBackbone`.
        num_classes: Number of answers.
        dropout: Dropout before the answer head.
        preprocessor: Optional `VLMPreprocessor` (tokenizer, image size, answers) saved with the model.

    Example:
        >>> model = VLMClassifier.from_preset("kvlm_tiny", num_classes=17, vocabulary_size=100)
    """

    PARTS = ("backbone", "preprocessor")
    OPTIONS = ("num_classes", "dropout")

    def __init__(
        self,
        backbone: VLMBackbone,
        num_classes: int,
        dropout: float = 0.0,
        preprocessor: VLMPreprocessor | None = None,
        **kwargs,
    ):
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2. Received: num_classes={num_classes}")
        check_preprocessor(preprocessor, backbone.image_size, backbone.sequence_length)
        inputs = backbone.input
        pooled = backbone(inputs)["pooled_output"]
        x = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
        logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.num_classes = num_classes
        self.dropout = dropout

    @classmethod
    def from_preset(
        cls, preset: str, num_classes: int | None = None, vocabulary_size: int | None = None, dropout: float = 0.0,
        preprocessor: VLMPreprocessor | None = None, **overrides,
    ) -> "VLMClassifier":
        """A classifier on a built-in preset's backbone (`overrides` go to the backbone), or
        the trained classifier saved in the preset folder `preset` (`save_to_preset`)."""
        if preset_dir.is_preset_dir(preset):
            return preset_dir.load_preset(preset, cls)
        preset_dir.require(preset, num_classes=num_classes, vocabulary_size=vocabulary_size)
        backbone = VLMBackbone.from_preset(preset, vocabulary_size=vocabulary_size, **overrides)
        return cls(backbone, num_classes=num_classes, dropout=dropout, preprocessor=preprocessor)


def classifier_sizes(model: keras.Model) -> tuple[int, int, int]:
    """`(image_size, sequence_length, num_classes)` of a classifier: a `VLMClassifier`, or a
    functional model over `{"images", "token_ids"}` inputs with one logits output (a domain
    specialist, a base with experts installed)."""
    if hasattr(model, "backbone"):
        return model.backbone.image_size, model.backbone.sequence_length, model.num_classes
    return model.input["images"].shape[1], model.input["token_ids"].shape[1], model.output.shape[-1]
