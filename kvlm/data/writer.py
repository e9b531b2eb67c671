"""Writes examples as a folder of PNG images plus `annotations.jsonl` (the format `load_folder` reads)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from kvlm.data.example import Example
from kvlm.data.folder import ANNOTATIONS_FILE


def png_bytes(example: Example) -> bytes:
    """The example's image encoded as PNG (read from `image_path` when it has no array)."""
    if example.image is None:
        if example.image_path is None:
            raise ValueError(f"Example {example.question!r} has neither an image nor an image_path")
        return Path(example.image_path).read_bytes()
    buffer = io.BytesIO()
    Image.fromarray(example.image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(examples: Sequence[Example], folder: str | Path) -> Path:
    """Writes `images/NNNNNN.png` and `annotations.jsonl` under `folder`; returns the annotations path.

    An existing annotations file is replaced only after the new one is complete.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, example in enumerate(examples):
        relative = f"images/{index:06d}.png"
        (folder / relative).write_bytes(png_bytes(example))
        record = {
            "image": relative, "question": example.question, "answer": example.answer,
            "caption": example.caption, "domain": example.domain,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    path = folder / ANNOTATIONS_FILE
    partial = path.with_suffix(".jsonl.partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(path)
    return path
