"""TF Serving's folder layout `<base_path>/<model_name>/<version>/saved_model.pb`.

Light on purpose (no TensorFlow import): the embedded server uses it too.
"""

from __future__ import annotations

import re
from pathlib import Path

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_model_name(name: str) -> str:
    """Returns `name` if it is a plain folder name; raises `ValueError` otherwise.

    Names are letters, digits, `.`, `_` and `-`, starting with a letter or digit, so
    a name can never be a path (`../x`, `/etc`, `a/b`) that escapes the base path.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"Invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128 characters), not a path."
        )
    return name


def is_version_name(name: str) -> bool:
    """Whether a folder name is a version: a positive integer without sign or leading zeros."""
    return name.isdigit() and name.isascii() and not name.startswith("0")


def version_dirs(model_dir: str | Path) -> dict[int, Path]:
    """Complete version folders (those holding a SavedModel) of `model_dir`, by version."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}
    found = {}
    for child in model_dir.iterdir():
        if child.is_dir() and is_version_name(child.name):
            if any((child / f).is_file() for f in SAVED_MODEL_FILES):
                found[int(child.name)] = child
    return dict(sorted(found.items()))


def next_version(model_dir: str | Path) -> int:
    """One more than the highest numeric folder in `model_dir` (1 when there is none)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return 1
    versions = [int(c.name) for c in model_dir.iterdir() if c.is_dir() and is_version_name(c.name)]
    return max(versions, default=0) + 1
