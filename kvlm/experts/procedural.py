"""`ProceduralDataset`: a `DatasetSpec.load` drawing scenes, questions and images from one seed."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvlm.data.example import Example


@dataclass(frozen=True)
class ProceduralDataset:
    """Generates examples deterministically from `(seed, split)`, one scene at a time.

    Per example, with one `numpy.random.Generator`: `scene(rng)` draws what the image
    shows, `question(scene, rng)` returns `(question, answer)`, `caption(scene)` the
    caption and `render(scene, image_size, rng)` the uint8 `(H, W, 3)` image. The scene
    is kept in `Example.extra[extra_key]`.

    Args:
        domain: `Example.domain` of every example.
        scene, question, caption, render: The four steps above.
        extra_key: Key of the scene in `Example.extra`.
        min_image_size: The smallest `image_size` the renderer can draw.

    Call args (`DatasetSpec.load`): `split`, `size`, `seed`, `image_size=32`.
    """

    domain: str
    scene: Callable[[np.random.Generator], Any]
    question: Callable[[Any, np.random.Generator], tuple[str, str]]
    caption: Callable[[Any], str]
    render: Callable[[Any, int, np.random.Generator], np.ndarray]
    extra_key: str = "scene"
    min_image_size: int = 24

    def __call__(self, split: str, size: int, seed: int, image_size: int = 32) -> list[Example]:
        if size < 0:
            raise ValueError(f"`size` must be >= 0. Received: size={size}")
        if image_size < self.min_image_size:
            raise ValueError(
                f"`image_size` must be >= {self.min_image_size} to draw {self.domain} images. "
                f"Received: image_size={image_size}"
            )
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
        examples = []
        for _ in range(size):
            scene = self.scene(rng)
            question, answer = self.question(scene, rng)
            examples.append(
                Example(
                    question=question,
                    answer=answer,
                    caption=self.caption(scene),
                    image=self.render(scene, image_size, rng),
                    domain=self.domain,
                    extra={self.extra_key: scene},
                )
            )
        return examples
