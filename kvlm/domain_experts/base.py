"""The base a domain expert is trained against and installed into, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

if TYPE_CHECKING:
    from kvlm.domain_experts.expert import DomainExpert


def fingerprint(model: keras.Model) -> str:
    """A short hash of `model`'s weights: what a trained expert names as its base."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(ops.convert_to_numpy(weight), dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


BASE_FILE = "kvlm.json"


@dataclass
class Base:
    """A trained base classifier with what experts are trained and installed against.

    Attributes:
        model: The `VLMClassifier` (with its `VLMPreprocessor`).
        keys: Its own `(fusion blocks + 1, d + 1, d)` router keys, on its general training data.
        metrics: Its held-out figures.
    """

    model: keras.Model
    keys: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def vocabulary(self) -> list[str]:
        return list(self.model.preprocessor.tokenizer.get_vocabulary())

    @property
    def answers(self) -> list[str]:
        return list(self.model.preprocessor.answers)

    @property
    def unknown_id(self) -> int:
        """The id the base tokenizer gives words it lacks."""
        return self.vocabulary.index("[UNK]")

    @property
    def tokenizer(self):
        return self.model.preprocessor.tokenizer

    @property
    def sequence_length(self) -> int:
        return self.model.backbone.sequence_length

    @property
    def image_size(self) -> int:
        return self.model.backbone.image_size

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.model)

    def save(self, preset: str | Path) -> Path:
        """Writes the model as a keras-hub preset folder, with `kvlm.json` (fingerprint, keys, metrics)."""
        folder = self.model.save_to_preset(preset)
        meta = {"fingerprint": self.fingerprint, "router_keys": self.keys.tolist(), "metrics": self.metrics}
        (Path(folder) / BASE_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")
        return Path(folder)

    @classmethod
    def load(cls, preset: str | Path = "kvlm_tiny_vqa") -> "Base":
        """A base saved by `save`: a folder, or a preset shipped in `kvlm.presets` by name."""
        from kvlm.models.classifier import VLMClassifier
        from kvlm.models.preset_dir import resolve

        folder = Path(resolve(preset))
        if not (folder / BASE_FILE).is_file():
            raise FileNotFoundError(f"No {BASE_FILE} in {folder}: not a kvlm base (see `scripts/release_base.py`).")
        meta = json.loads((folder / BASE_FILE).read_text(encoding="utf-8"))
        base = cls(VLMClassifier.from_preset(folder), np.asarray(meta["router_keys"], np.float32), meta["metrics"])
        if base.fingerprint != meta["fingerprint"]:
            raise ValueError(f"The weights in {folder} are not those of the base {meta['fingerprint']} it names.")
        return base


def check_base(expert: DomainExpert, base_fingerprint: str) -> None:
    """Raises unless `expert` was trained against the base with `base_fingerprint`."""
    if expert.base != base_fingerprint:
        raise ValueError(
            f"The expert {expert.name!r} was trained for the base {expert.base}, but this base is "
            f"{base_fingerprint}; train it again against this base (`kvlm train --task domain_expert`)."
        )
