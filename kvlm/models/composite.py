"""Models assembled from parts: one `get_config` / `from_config` for all of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras

from kvlm.models import preset_dir


class Composite:
    """Mixin of a `keras.Model` whose constructor takes built parts, as keras-hub's tasks do.

    `PARTS` names the constructor arguments that are layers or models (saved as nested Keras
    objects), `OPTIONS` the plain ones; each is kept as an attribute of the same name.
    `save_to_preset` writes the model in keras-hub's preset layout; the task's `from_preset`
    reads such a folder back.
    """

    PARTS: tuple[str, ...] = ()
    OPTIONS: tuple[str, ...] = ()

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            **{part: keras.saving.serialize_keras_object(getattr(self, part)) for part in self.PARTS},
            **{option: getattr(self, option) for option in self.OPTIONS},
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        config = dict(config)
        for part in cls.PARTS:
            if isinstance(config.get(part), dict):
                config[part] = keras.saving.deserialize_keras_object(config[part])
        return cls(**config)

    def save_to_preset(self, path: str | os.PathLike) -> Path:
        """Saves the model and its preprocessor in keras-hub's preset layout (`kvlm.models.preset_dir`)."""
        return preset_dir.save_to_preset(self, path)

    def compile_from_config(self, config):
        # Keras skips this for models that override `compile`; these models restore it the same way.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, **kwargs):
        """The model saved in the preset folder `preset` by `save_to_preset`."""
        if kwargs:
            raise ValueError(f"A saved preset takes no arguments. Received: {sorted(kwargs)}")
        return preset_dir.load_preset(preset, cls)


class OwnLoss:
    """Mixin of a model whose `compute_loss` is its loss (`LOSS` names it): `compile` takes no `loss`."""

    LOSS = "its own loss"

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """`keras.Model.compile` without `loss`: the loss is set by the model."""
        if loss is not None:
            raise ValueError(
                f"{type(self).__name__} computes {self.LOSS}; leave `loss` out of compile(). Received: loss={loss!r}"
            )
        super().compile(optimizer=optimizer, **kwargs)
