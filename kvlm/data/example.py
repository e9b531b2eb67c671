"""The record every kvlm dataset yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Example:
    """One image-question-answer-caption record.

    `image` is a uint8 `(H, W, 3)` array, or `None` when `image_path` points at a file
    that the input pipeline decodes.
    """

    question: str
    answer: str
    caption: str
    image: np.ndarray | None = None
    image_path: str | None = None
    domain: str = "shapes"
    extra: dict = field(default_factory=dict)
