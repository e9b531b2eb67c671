"""Task models in keras-hub's preset layout: a folder any preset host can share.

```
config.json            the model (its preprocessor included), as `keras.saving` serializes it
model.weights.h5       the weights
metadata.json          keras and keras-hub versions, parameter count, date
preprocessor.json      the preprocessor alone (when the model has one)
tokenizer.json         the tokenizer alone, and its vocabulary in
assets/tokenizer/vocabulary.txt
```

The files are written and read with keras-hub's own preset machinery, so a trained model
is shared like a keras-hub preset; `kvlm_tiny` and the other built-in names stay
architecture-only presets.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
from keras_hub.src.utils import preset_utils


def resolve(preset: str | os.PathLike) -> str:
    """The folder of `preset`: a trained preset shipped in `kvlm.presets` by name, else `preset` itself."""
    from kvlm.presets import preset_path

    shipped = preset_path(preset) if isinstance(preset, str) else None
    return os.fspath(shipped or preset)


def is_preset_dir(preset: str | os.PathLike) -> bool:
    """Whether `preset` names a folder holding a saved preset (`config.json`), or a shipped trained preset."""
    return (Path(resolve(preset)) / preset_utils.CONFIG_FILE).is_file()


def require(preset: str, **arguments) -> None:
    """Raises unless every argument needed to build from the built-in preset `preset` is given."""
    missing = [name for name, value in arguments.items() if value is None]
    if missing:
        raise ValueError(
            f"Building from the architecture preset {preset!r} needs {', '.join(f'`{m}`' for m in missing)}. "
            f"Received: {', '.join(f'{m}=None' for m in missing)}"
        )


def save_to_preset(model: keras.Model, preset_dir: str | os.PathLike) -> Path:
    """Writes `model` (and its `preprocessor`, if any) to `preset_dir`; returns the folder."""
    saver = preset_utils.KerasPresetSaver(os.fspath(preset_dir))
    saver.save_backbone(model)
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        saver.save_preprocessor(preprocessor)
    return Path(preset_dir)


def load_preset(preset_dir: str | os.PathLike, cls: type | None = None) -> keras.Model:
    """The model saved in `preset_dir` by `save_to_preset`, with its weights and vocabulary.

    Raises:
        FileNotFoundError: `preset_dir` holds no `config.json`.
        ValueError: the preset holds a model that is not a `cls`.
    """
    preset = resolve(preset_dir)
    if not is_preset_dir(preset):
        raise FileNotFoundError(
            f"No {preset_utils.CONFIG_FILE} in {preset}: save a model there with `model.save_to_preset(...)`."
        )
    config = preset_utils.load_json(preset, preset_utils.CONFIG_FILE)
    model = keras.saving.deserialize_keras_object(config)
    if cls is not None and not isinstance(model, cls):
        raise ValueError(f"The preset {preset} holds a {type(model).__name__}, not a {cls.__name__}.")
    model.load_weights(preset_utils.get_file(preset, preset_utils.MODEL_WEIGHTS_FILE))
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        preprocessor.tokenizer.load_preset_assets(preset)
    return model
