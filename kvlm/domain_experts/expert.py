"""A trained domain expert: what one domain brings to a base, saved as a folder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EXPERT_FILE = "expert.json"
WEIGHTS_FILE = "expert.weights.npz"


@dataclass
class DomainExpert:
    """What one domain's expert brings to a base model (see the module docstring).

    Attributes:
        name, domain: The expert's registry name and domain.
        base: Fingerprint of the base it was trained against.
        words: New tokens, in the order of `word_embeddings`.
        answers: New answers, in the order of the answer columns.
        ffn_weights: Per fusion block, the `FeedForward` weights (inner kernel, inner bias,
            outer kernel, outer bias).
        word_embeddings: `(len(words), d)`.
        answer_kernel, answer_bias: `(d, len(answers))` and `(len(answers),)`.
        keys: `(num_fusion_layers + 1, d + 1, d)` Gaussian router keys (`kvlm.layers.moe.keys`):
            one per fusion block, then the head's.
        metrics: The specialist's held-out figures (e.g. `accuracy`).
    """

    name: str
    domain: str
    base: str
    words: list[str]
    answers: list[str]
    ffn_weights: list[list[np.ndarray]]
    word_embeddings: np.ndarray
    answer_kernel: np.ndarray
    answer_bias: np.ndarray
    keys: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Writes `expert.json` and `expert.weights.npz` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"word_embeddings": self.word_embeddings, "answer_kernel": self.answer_kernel,
                  "answer_bias": self.answer_bias, "keys": self.keys}
        for i, weights in enumerate(self.ffn_weights):
            arrays |= {f"ffn_{i}_{j}": w for j, w in enumerate(weights)}
        np.savez_compressed(directory / WEIGHTS_FILE, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
        meta = {k: v for k, v in asdict(self).items() if k in ("name", "domain", "base", "words", "answers", "metrics")}
        meta["fusion_blocks"] = len(self.ffn_weights)
        (directory / EXPERT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "DomainExpert":
        """Reads an expert written by `save`.

        Raises:
            FileNotFoundError: `directory` holds no `expert.json`.
        """
        directory = Path(directory)
        if not (directory / EXPERT_FILE).is_file():
            raise FileNotFoundError(f"No {EXPERT_FILE} in {directory}: not a trained kvlm expert.")
        meta = json.loads((directory / EXPERT_FILE).read_text(encoding="utf-8"))
        with np.load(directory / WEIGHTS_FILE) as arrays:
            ffn = [[arrays[f"ffn_{i}_{j}"] for j in range(4)] for i in range(meta.pop("fusion_blocks"))]
            return cls(**meta, ffn_weights=ffn, word_embeddings=arrays["word_embeddings"],
                       answer_kernel=arrays["answer_kernel"], answer_bias=arrays["answer_bias"], keys=arrays["keys"])
