"""A trained domain expert: what one domain brings to a base, saved as a folder.

Two kinds share the format:

- an adapter expert (`kind == "adapters"`) carries low-rank adapters through the whole
  path (`expert.lora.h5`, keras-hub's layout), its own answer head over all of its answers,
  its new words' rows, one Gaussian key of the base encoders' routing feature and the
  log-likelihood below which it abstains, and (optional: older experts lack them) a question key
  over its own vocabulary, with the score below which it abstains, and the log-likelihood
  below which its key's image half abstains;
- an FFN expert (`kind == "ffn"`, the first kind) carries a branch of each fusion block's
  feed-forward network, columns for the answers the base lacks and one key per block.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvlm.domain_experts.adapters import load_adapters, save_adapters

EXPERT_FILE = "expert.json"
WEIGHTS_FILE = "expert.weights.npz"
LORA_FILE = "expert.lora.h5"


@dataclass
class DomainExpert:
    """What one domain's expert brings to a base model (see the module docstring).

    Attributes:
        name, domain: The expert's registry name and domain.
        base: Fingerprint of the base it was trained against.
        words: New tokens, in the order of `word_embeddings`.
        answers: The answers of its head, in column order: all of them (adapter expert) or
            those the base lacks (FFN expert).
        ffn_weights: FFN expert: per fusion block, the `FeedForward` weights (inner kernel,
            inner bias, outer kernel, outer bias). Empty for an adapter expert.
        word_embeddings: `(len(words), d)`.
        answer_kernel, answer_bias: `(d, len(answers))` and `(len(answers),)`.
        keys: Gaussian router keys (`kvlm.layers.moe.keys`): adapter expert `(1, 2 d + 1, 2 d)`
            of the base encoders' routing feature (`routing.routing_feature`); FFN expert
            `(num_fusion_layers + 1, d + 1, d)`, one per fusion block, then the head's.
        metrics: The specialist's held-out figures (e.g. `accuracy`).
        adapters: Adapter expert: `{layer index: (a, b)}` (`kvlm.domain_experts.adapters`).
        threshold: Adapter expert: the log-likelihood under its key below which it abstains.
        question_key: Adapter expert, optional: `(base vocabulary + words,)` log-probabilities of
            its questions' tokens in its own tokenizer's ids (`routing.question_key`).
        question_threshold: With `question_key`: the question score below which it abstains.
        image_threshold: With `question_key`: the log-likelihood of the image half of the routing
            feature under its key's marginal (`routing.marginal_key`) below which it abstains.
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
    adapters: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    threshold: float | None = None
    question_key: np.ndarray | None = None
    question_threshold: float | None = None
    image_threshold: float | None = None

    @property
    def kind(self) -> str:
        """`"adapters"` or `"ffn"` (see the module docstring)."""
        return "adapters" if self.adapters else "ffn"

    def save(self, directory: str | Path) -> Path:
        """Writes `expert.json`, `expert.weights.npz` and (adapter expert) `expert.lora.h5` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"word_embeddings": self.word_embeddings, "answer_kernel": self.answer_kernel,
                  "answer_bias": self.answer_bias, "keys": self.keys}
        for i, weights in enumerate(self.ffn_weights):
            arrays |= {f"ffn_{i}_{j}": w for j, w in enumerate(weights)}
        if self.question_key is not None:
            arrays["question_key"] = self.question_key
        np.savez_compressed(directory / WEIGHTS_FILE, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
        meta = {k: v for k, v in asdict(self).items() if k in ("name", "domain", "base", "words", "answers", "metrics")}
        meta["fusion_blocks"] = len(self.ffn_weights)
        if self.adapters:
            save_adapters(self.adapters, directory / LORA_FILE)
            meta |= {"kind": self.kind, "threshold": self.threshold}
        if self.question_key is not None:
            meta |= {"question_threshold": self.question_threshold, "image_threshold": self.image_threshold}
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
        if meta.pop("kind", "ffn") == "adapters":
            meta["adapters"] = load_adapters(directory / LORA_FILE)
        with np.load(directory / WEIGHTS_FILE) as arrays:
            ffn = [[arrays[f"ffn_{i}_{j}"] for j in range(4)] for i in range(meta.pop("fusion_blocks"))]
            return cls(**meta, ffn_weights=ffn, word_embeddings=arrays["word_embeddings"],
                       answer_kernel=arrays["answer_kernel"], answer_bias=arrays["answer_bias"], keys=arrays["keys"],
                       question_key=arrays["question_key"] if "question_key" in arrays else None)
