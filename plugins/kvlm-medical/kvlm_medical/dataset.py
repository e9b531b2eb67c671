"""Procedural medical scans ("medical_scans").

A scan shows a body with four organs at fixed places (lung upper left, heart upper
right, liver lower left, stomach lower right) and one to three lesions, each in a
different organ and of a different kind: tumor (white), cyst (black), nodule
(yellow), small or large. Questions name an organ or a lesion kind and ask about the
other attributes, so both the image and the question are needed.
"""

from __future__ import annotations

import numpy as np

from kvlm.experts.procedural import ProceduralDataset

ORGANS = ("lung", "heart", "liver", "stomach")
# Organ centre (x, y) as a fraction of the image size, and its tint.
ORGAN_LAYOUT = {
    "lung": ((0.3, 0.3), (70, 100, 150)),
    "heart": ((0.7, 0.3), (150, 70, 80)),
    "liver": ((0.3, 0.7), (130, 90, 50)),
    "stomach": ((0.7, 0.7), (80, 130, 80)),
}
LESIONS = {"tumor": (245, 245, 245), "cyst": (5, 5, 5), "nodule": (245, 215, 30)}
SIZES = {"small": 0.08, "large": 0.15}  # Radius as a fraction of the image size.
COUNTS = ("one", "two", "three")
QUESTION_TYPES = ("count", "organ", "size", "kind", "exists", "side")
ANSWERS = tuple(sorted(set(ORGANS) | set(LESIONS) | set(SIZES) | set(COUNTS) | {"yes", "no", "left", "right"}))


def _disc(image_size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2


def render(lesions: list[dict], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws the body, its organs and `lesions` (dicts with organ, kind, size)."""
    s = float(image_size)
    image = np.full((image_size, image_size, 3), rng.integers(5, 20), dtype=np.float32)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    body = ((xx - s / 2) / (0.48 * s)) ** 2 + ((yy - s / 2) / (0.49 * s)) ** 2 <= 1.0
    image[body] = 45.0
    for (fx, fy), tint in ORGAN_LAYOUT.values():
        image[_disc(image_size, fx * s, fy * s, 0.2 * s)] = tint
    for lesion in lesions:
        (fx, fy), _ = ORGAN_LAYOUT[lesion["organ"]]
        jitter = rng.uniform(-0.04, 0.04, 2) * s
        mask = _disc(image_size, fx * s + jitter[0], fy * s + jitter[1], SIZES[lesion["size"]] * s)
        image[mask] = np.array(LESIONS[lesion["kind"]], np.float32) + rng.normal(0.0, 6.0, 3)
    image += rng.normal(0.0, 5.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def caption_for(lesions: list[dict]) -> str:
    parts = [f"a {x['size']} {x['kind']} in the {x['organ']}" for x in lesions]
    return "a scan with " + " and ".join(parts)


def _side(organ: str) -> str:
    return "left" if ORGAN_LAYOUT[organ][0][0] < 0.5 else "right"


def question_for(lesions: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    """Draws a question type uniformly and returns `(question, answer)`."""
    kind = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    target = lesions[rng.integers(len(lesions))]
    if kind == "count":
        return "how many lesions are in the scan", COUNTS[len(lesions) - 1]
    if kind == "organ":
        return f"which organ has the {target['kind']}", target["organ"]
    if kind == "size":
        return f"what size is the {target['kind']}", target["size"]
    if kind == "kind":
        return f"what kind of lesion is in the {target['organ']}", target["kind"]
    if kind == "side":
        return f"which side is the {target['kind']} on", _side(target["organ"])
    # exists: half the time ask about an organ with a lesion.
    if rng.random() < 0.5:
        return f"is there a lesion in the {target['organ']}", "yes"
    healthy = [o for o in ORGANS if o not in {x["organ"] for x in lesions}]
    return f"is there a lesion in the {healthy[rng.integers(len(healthy))]}", "no"


def scene(rng: np.random.Generator) -> list[dict]:
    """One to three lesions, each in a different organ and of a different kind."""
    count = int(rng.integers(1, 4))
    organs = rng.choice(len(ORGANS), count, replace=False)
    kinds = rng.choice(len(LESIONS), count, replace=False)
    return [
        {"organ": ORGANS[o], "kind": list(LESIONS)[k], "size": list(SIZES)[rng.integers(len(SIZES))]}
        for o, k in zip(sorted(organs), kinds)
    ]


load = ProceduralDataset(
    domain="medical", scene=scene, question=question_for, caption=caption_for, render=render, extra_key="lesions"
)
