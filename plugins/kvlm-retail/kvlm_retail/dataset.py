"""Procedural store shelves ("retail_shelves").

Two shelves (top, bottom) with three places each (left, middle, right) hold one to
three products of different kinds (a wide box, a tall bottle with a neck, a can with a
silver lid) and colours. Each product has a price tag under it: white, or yellow when
it is on sale. Questions name a shelf, a product kind or a colour and ask about the
rest, so both the image and the question are needed.
"""

from __future__ import annotations

import numpy as np

from kvlm.experts.procedural import ProceduralDataset

SHELVES = ("top", "bottom")
PLACES = ("left", "middle", "right")
COLORS = {"red": (215, 40, 40), "green": (40, 180, 60), "blue": (45, 80, 225), "purple": (150, 50, 190)}
# Product kinds: (width, height) as fractions of the image size.
KINDS = {"box": (0.3, 0.2), "bottle": (0.08, 0.28), "can": (0.14, 0.2)}
LID = (205, 205, 210)  # Cans have a silver lid.
TAGS = {False: (250, 250, 250), True: (250, 215, 0)}
COUNTS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("count", "color", "shelf", "place", "sale")
ANSWERS = tuple(sorted(set(SHELVES) | set(PLACES) | set(COLORS) | set(COUNTS) | {"yes", "no"}))
WALL = (105, 100, 95)
BOARD = (150, 95, 45)


def render(products: list[dict], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws two shelves with `products` (dicts with kind, color, shelf, place, sale)."""
    s = float(image_size)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    image = np.full((image_size, image_size, 3), WALL, dtype=np.float32)
    for shelf in range(len(SHELVES)):
        board = (shelf + 0.68) * s / 2
        image[(yy >= board) & (yy < board + 0.06 * s)] = BOARD
    for product in products:
        board = (SHELVES.index(product["shelf"]) + 0.68) * s / 2
        cx = (PLACES.index(product["place"]) + 0.5) * s / 3 + rng.uniform(-0.02, 0.02) * s
        width, height = (f * s for f in KINDS[product["kind"]])
        body = (np.abs(xx - cx) <= width / 2) & (yy < board) & (yy >= board - height)
        if product["kind"] == "bottle":  # A narrow neck on top.
            body |= (np.abs(xx - cx) <= width / 4) & (yy < board - height) & (yy >= board - height - 0.06 * s)
        image[body] = np.array(COLORS[product["color"]], np.float32) + rng.normal(0.0, 6.0, 3)
        if product["kind"] == "can":
            image[body & (yy < board - height + 0.06 * s)] = LID
        tag = (np.abs(xx - cx) <= 0.1 * s) & (yy >= board + 0.06 * s) & (yy < board + 0.15 * s)
        image[tag] = TAGS[product["sale"]]
    image += rng.normal(0.0, 5.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def caption_for(products: list[dict]) -> str:
    parts = [
        f"a {p['color']} {p['kind']}{' on sale' if p['sale'] else ''} on the {p['place']} of the {p['shelf']} shelf"
        for p in products
    ]
    return " and ".join(parts)


def question_for(products: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    """Draws a question type uniformly and returns `(question, answer)`."""
    kind = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    target = products[rng.integers(len(products))]
    if kind == "count":
        shelf = SHELVES[rng.integers(len(SHELVES))]
        return f"how many products are on the {shelf} shelf", COUNTS[sum(p["shelf"] == shelf for p in products)]
    if kind == "color":
        return f"what color is the {target['kind']}", target["color"]
    if kind == "shelf":
        return f"which shelf is the {target['kind']} on", target["shelf"]
    if kind == "place":
        return f"where is the {target['color']} product", target["place"]
    return f"is the {target['kind']} on sale", "yes" if target["sale"] else "no"


SPOTS = tuple((shelf, place) for shelf in SHELVES for place in PLACES)


def scene(rng: np.random.Generator) -> list[dict]:
    """One to three products of different kinds and colours, each at its own spot."""
    count = int(rng.integers(1, 4))
    chosen = sorted(rng.choice(len(SPOTS), count, replace=False))
    kinds = rng.choice(len(KINDS), count, replace=False)
    colors = rng.choice(len(COLORS), count, replace=False)
    return [
        {
            "kind": list(KINDS)[k],
            "color": list(COLORS)[c],
            "shelf": SPOTS[i][0],
            "place": SPOTS[i][1],
            "sale": bool(rng.random() < 0.5),
        }
        for i, k, c in zip(chosen, kinds, colors)
    ]


load = ProceduralDataset(
    domain="retail", scene=scene, question=question_for, caption=caption_for, render=render, extra_key="products"
)
