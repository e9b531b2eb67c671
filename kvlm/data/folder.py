"""Loader for users' own data: a folder of images plus `annotations.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

from kvlm.data.example import Example

ANNOTATIONS_FILE = "annotations.jsonl"
REQUIRED_KEYS = ("image", "question", "answer")


class AnnotationError(ValueError):
    """A malformed line in an annotations file; the message names file and line."""


def load_folder(folder: str | Path, domain: str = "custom") -> list[Example]:
    """Reads `folder/annotations.jsonl`.

    Each line is a JSON object with `image` (a path relative to `folder`), `question`,
    `answer` and optionally `caption`. Images are decoded later, in the input pipeline.

    Raises:
        FileNotFoundError: the annotations file or an image is missing (with line number).
        AnnotationError: a line is not a JSON object with string fields.
    """
    folder = Path(folder)
    path = folder / ANNOTATIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"No {ANNOTATIONS_FILE} in {folder}")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnnotationError(f"{path}:{line_number}: invalid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise AnnotationError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            missing = [key for key in REQUIRED_KEYS if key not in record]
            if missing:
                raise AnnotationError(f"{path}:{line_number}: missing key(s) {missing}")
            for key in (*REQUIRED_KEYS, "caption"):
                if key in record and not isinstance(record[key], str):
                    raise AnnotationError(f"{path}:{line_number}: {key!r} must be a string")
            image_path = (folder / record["image"]).resolve()
            if not image_path.is_file():
                raise FileNotFoundError(f"{path}:{line_number}: image not found: {image_path}")
            examples.append(
                Example(
                    question=record["question"],
                    answer=record["answer"],
                    caption=record.get("caption", ""),
                    image_path=str(image_path),
                    domain=record.get("domain", domain),
                )
            )
    if not examples:
        raise AnnotationError(f"{path}: no examples")
    return examples
