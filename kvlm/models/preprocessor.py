"""The preprocessing a task model carries: tokenizer, image size and answer list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import keras_hub
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="kvlm")
class VLMPreprocessor(keras.layers.Layer):
    """Turns raw images and texts into a task model's inputs, and logits into answers.

    Held by a task model (`preprocessor=`), it is saved with it: in a `.keras` file the
    tokenizer's vocabulary is an asset; in a preset folder it is `tokenizer.json` and
    `assets/tokenizer/vocabulary.txt`, as in keras-hub.

    Args:
        tokenizer: A keras-hub `WordPieceTokenizer` with a `sequence_length`
            (`kvlm.data.make_tokenizer`).
        image_size: Side of the square images the model reads.
        answers: A classifier's answer strings in label order; empty for other tasks.

    `preprocess(images, texts)` gives the model's inputs; `decode_answers(logits)` the answers.
    """

    def __init__(
        self,
        tokenizer: keras_hub.tokenizers.WordPieceTokenizer,
        image_size: int,
        answers: Sequence[str] = (),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if tokenizer.sequence_length is None:
            raise ValueError("The tokenizer must pad to a `sequence_length`. Received: sequence_length=None")
        if image_size < 1:
            raise ValueError(f"`image_size` must be >= 1. Received: image_size={image_size}")
        if len(set(answers)) != len(answers):
            raise ValueError(f"`answers` must be distinct. Received: answers={list(answers)}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.answers = list(answers)

    @property
    def sequence_length(self) -> int:
        return self.tokenizer.sequence_length

    def preprocess(self, images, texts) -> dict:
        """Model inputs from uint8 or float `(batch, H, W, 3)` pixels in [0, 255] and a batch of strings.

        Returns `{"images": float32 (batch, image_size, image_size, 3) in [0, 1],
        "token_ids": int32 (batch, sequence_length)}`.
        """
        images = ops.image.resize(
            ops.cast(ops.convert_to_tensor(images), "float32"), (self.image_size, self.image_size), antialias=True
        )
        token_ids = ops.convert_to_tensor(np.asarray(self.tokenizer(list(texts)), "int32"))
        return {"images": ops.clip(images / 255.0, 0.0, 1.0), "token_ids": token_ids}

    def decode_answers(self, logits) -> list[str]:
        """The answer string of each row of `(batch, len(answers))` logits."""
        if not self.answers:
            raise ValueError("This preprocessor has no answers: it belongs to a model that does not classify.")
        return [self.answers[i] for i in np.argmax(ops.convert_to_numpy(logits), axis=-1)]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            tokenizer=keras.saving.serialize_keras_object(self.tokenizer),
            image_size=self.image_size,
            answers=self.answers,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["tokenizer"] = keras.saving.deserialize_keras_object(config["tokenizer"])
        return cls(**config)


def check_preprocessor(preprocessor: VLMPreprocessor | None, image_size: int, sequence_length: int) -> None:
    """Raises unless `preprocessor` (when given) makes the model's `image_size` x `sequence_length` inputs."""
    if preprocessor is None:
        return
    if not isinstance(preprocessor, VLMPreprocessor):
        raise TypeError(f"`preprocessor` must be a VLMPreprocessor. Received: preprocessor={preprocessor!r}")
    made, needed = (preprocessor.image_size, preprocessor.sequence_length), (image_size, sequence_length)
    if made != needed:
        raise ValueError(
            "The preprocessor must make the model's inputs: (image_size, sequence_length) "
            f"{needed}. Received: preprocessor with {made}"
        )
