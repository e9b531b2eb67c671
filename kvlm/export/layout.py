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


MAX_VERSION = 2**63 - 1


def parse_version(name: str) -> int | None:
    """The version a folder name stands for, as TF Serving reads it, or None.

    Folder names are parsed as a non-negative int64, so `00000123` is version 123.
    """
    if not (name.isascii() and name.isdigit()):
        return None
    version = int(name)
    return version if version <= MAX_VERSION else None


def scan_versions(model_dir: str | Path) -> tuple[dict[int, Path], dict[str, str]]:
    """`(versions, skipped)`: complete version folders by version, and why every other entry was skipped."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}, {}
    found: dict[int, Path] = {}
    skipped: dict[str, str] = {}
    for child in sorted(model_dir.iterdir()):
        version = parse_version(child.name)
        if not child.is_dir():
            continue
        if version is None:
            skipped[child.name] = "not a version number (a non-negative integer)"
        elif not any((child / f).is_file() for f in SAVED_MODEL_FILES):
            skipped[child.name] = f"no {' or '.join(SAVED_MODEL_FILES)} in it (yet)"
        elif version in found:
            skipped[child.name] = f"version {version} is already served from {found[version].name}"
        else:
            found[version] = child
    return dict(sorted(found.items())), skipped


def version_dirs(model_dir: str | Path) -> dict[int, Path]:
    """Complete version folders (those holding a SavedModel) of `model_dir`, by version."""
    return scan_versions(model_dir)[0]


def next_version(model_dir: str | Path) -> int:
    """One more than the highest numeric folder in `model_dir` (1 when there is none)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return 1
    versions = [v for c in model_dir.iterdir() if c.is_dir() and (v := parse_version(c.name)) is not None]
    return max(versions, default=0) + 1
