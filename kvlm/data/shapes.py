"""Procedural multi-attribute visual question answering dataset ("shapes").

Each image holds one to three coloured shapes, one per horizontal slot (left,
middle, right), each small or large. Shapes and colours are distinct within an
image, so every question has exactly one answer, and every question needs both
the image and the question to be answered: the question names the object (by
shape or colour) and the attribute asked for.
"""

from __future__ import annotations

import numpy as np

from kvlm.data.example import Example

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
COUNTS = ("one", "two", "three")
QUESTION_TYPES = ("color", "shape", "position", "count", "exists", "size")
ANSWERS = tuple(sorted(set(COLORS) | set(SHAPES) | set(SIZES) | set(POSITIONS) | set(COUNTS) | {"yes", "no"}))


def _shape_mask(kind: str, size: int, center_x: float, center_y: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - center_x, yy - center_y
    if kind == "circle":
        return dx**2 + dy**2 <= radius**2
    if kind == "square":
        half = radius * 0.95
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward triangle inscribed in the radius.
    top, bottom = -radius, radius * 0.8
    inside_y = (dy >= top) & (dy <= bottom)
    half_width = (dy - top) / (bottom - top) * radius
    return inside_y & (np.abs(dx) <= half_width)


def render(objects: list[dict], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws `objects` (dicts with shape, color, size, position) on a noisy background."""
    background = rng.integers(20, 60)
    image = np.full((image_size, image_size, 3), background, dtype=np.float32)
    image += rng.normal(0.0, 6.0, image.shape)
    slot = image_size / 3.0
    for obj in objects:
        radius = slot * (0.32 if obj["size"] == "small" else 0.48)
        cx = slot * (POSITIONS.index(obj["position"]) + 0.5) + rng.uniform(-0.08, 0.08) * slot
        cy = image_size / 2.0 + rng.uniform(-0.12, 0.12) * image_size
        mask = _shape_mask(obj["shape"], image_size, cx, cy, radius)
        color = np.array(COLORS[obj["color"]], np.float32) + rng.normal(0.0, 8.0, 3)
        image[mask] = color
    return np.clip(image, 0, 255).astype(np.uint8)


def caption_for(objects: list[dict]) -> str:
    """A caption listing the objects from left to right."""
    where = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
    parts = [f"a {o['size']} {o['color']} {o['shape']} {where[o['position']]}" for o in objects]
    return " and ".join(parts)


def question_for(objects: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    """Draws a question type uniformly and returns `(question, answer)`."""
    kind = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    target = objects[rng.integers(len(objects))]
    if kind == "color":
        return f"what color is the {target['shape']}", target["color"]
    if kind == "shape":
        return f"what shape is the {target['color']} object", target["shape"]
    if kind == "position":
        return f"where is the {target['shape']}", target["position"]
    if kind == "size":
        return f"what size is the {target['color']} {target['shape']}", target["size"]
    if kind == "count":
        return "how many shapes are there", COUNTS[len(objects) - 1]
    # exists: half the time ask about an object that is present.
    if rng.random() < 0.5:
        return f"is there a {target['color']} {target['shape']}", "yes"
    present = {(o["color"], o["shape"]) for o in objects}
    while True:
        color = list(COLORS)[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if (color, shape) not in present:
            return f"is there a {color} {shape}", "no"


def generate(size: int, seed: int, image_size: int = 32) -> list[Example]:
    """Generates `size` examples deterministically from `seed`."""
    if size < 0:
        raise ValueError(f"`size` must be >= 0. Received: size={size}")
    if image_size < 24:
        raise ValueError(f"`image_size` must be >= 24 to draw shapes. Received: image_size={image_size}")
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(size):
        count = int(rng.integers(1, 4))
        positions = sorted(rng.choice(len(POSITIONS), count, replace=False))
        shapes = rng.choice(len(SHAPES), count, replace=False)
        colors = rng.choice(len(COLORS), count, replace=False)
        objects = [
            {
                "shape": SHAPES[s],
                "color": list(COLORS)[c],
                "size": SIZES[rng.integers(len(SIZES))],
                "position": POSITIONS[p],
            }
            for p, s, c in zip(positions, shapes, colors)
        ]
        question, answer = question_for(objects, rng)
        examples.append(
            Example(
                question=question,
                answer=answer,
                caption=caption_for(objects),
                image=render(objects, image_size, rng),
                domain="shapes",
                extra={"objects": objects},
            )
        )
    return examples
