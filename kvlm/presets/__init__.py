"""Trained presets shipped inside kvlm, in keras-hub's preset layout (`kvlm.models.preset_dir`).

`kvlm_tiny_vqa` is the released general base: `kvlm_tiny` with the CNN image encoder, trained
on the procedural shapes VQA task by `python scripts/release_base.py`. Its `kvlm.json` holds
its fingerprint (which trained experts name), its router keys and its held-out accuracy.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent
BASE_PRESET = "kvlm_tiny_vqa"


def shipped_presets() -> list[str]:
    """Names of the trained presets in this package."""
    return sorted(p.name for p in FOLDER.iterdir() if (p / "config.json").is_file())


def preset_path(name: str) -> Path | None:
    """The folder of the shipped preset `name`, or None."""
    return FOLDER / name if name in shipped_presets() else None
