"""Procedural legal documents ("legal_documents").

A page on a desk is divided into three rows (top, middle, bottom) and two columns
(left, right). One to three cells hold clause blocks (grey text lines); a document may
be signed (a blue or black squiggle) and sealed (a red, gold or green disc), each in a
cell of its own. Questions ask about one element, so both the image and the question
are needed.
"""

from __future__ import annotations

import numpy as np

from kvlm.experts.procedural import ProceduralDataset

ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "right")
INKS = {"blue": (30, 60, 210), "black": (15, 15, 15)}
SEALS = {"red": (205, 30, 30), "gold": (215, 170, 30), "green": (30, 150, 60)}
COUNTS = ("one", "two", "three")
QUESTION_TYPES = ("clauses", "signed", "sealed", "signature_row", "seal_side", "seal_color", "ink")
ANSWERS = tuple(
    sorted(set(ROWS) | set(COLUMNS) | set(INKS) | set(SEALS) | set(COUNTS) | {"yes", "no"})
)
PAGE = (140, 135, 118)  # Recycled paper: mid-tone, so dark ink and bright seals both stand out.
TEXT = (55, 52, 48)


def _cell_box(cell: tuple[int, int], image_size: int) -> tuple[float, float, float, float]:
    """`(x0, y0, width, height)` of a cell inside the page margin."""
    margin = 0.06 * image_size
    width, height = (image_size - 2 * margin) / 2, (image_size - 2 * margin) / 3
    return margin + cell[1] * width, margin + cell[0] * height, width, height


def render(document: dict, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws the page with its clause blocks, signature and seal."""
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    image = np.full((s, s, 3), rng.integers(30, 55), dtype=np.float32)
    margin = 0.03 * s
    image[(xx > margin) & (xx < s - margin) & (yy > margin) & (yy < s - margin)] = PAGE
    for cell in document["clauses"]:
        x0, y0, w, h = _cell_box(cell, s)
        for offset in (0.28, 0.7):
            line = (xx > x0 + 0.1 * w) & (xx < x0 + 0.9 * w) & (np.abs(yy - (y0 + offset * h)) <= 0.13 * h)
            image[line] = TEXT
    if document["signature"] is not None:
        x0, y0, w, h = _cell_box(document["signature"]["cell"], s)
        phase = rng.uniform(0, 2 * np.pi)
        curve = y0 + 0.5 * h + 0.28 * h * np.sin(2 * np.pi * (xx - x0) / (0.45 * w) + phase)
        stroke = (xx > x0 + 0.1 * w) & (xx < x0 + 0.9 * w) & (np.abs(yy - curve) <= 0.05 * s)
        image[stroke] = INKS[document["signature"]["ink"]]
    if document["seal"] is not None:
        x0, y0, w, h = _cell_box(document["seal"]["cell"], s)
        disc = (xx - (x0 + w / 2)) ** 2 + (yy - (y0 + h / 2)) ** 2 <= (0.42 * h) ** 2
        image[disc] = np.array(SEALS[document["seal"]["color"]], np.float32) + rng.normal(0.0, 6.0, 3)
    image += rng.normal(0.0, 5.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def caption_for(document: dict) -> str:
    count = len(document["clauses"])
    parts = [f"a document with {COUNTS[count - 1]} clause{'s' if count > 1 else ''}"]
    if document["signature"] is not None:
        sig = document["signature"]
        parts.append(f"signed in {sig['ink']} ink at the {ROWS[sig['cell'][0]]}")
    if document["seal"] is not None:
        seal = document["seal"]
        parts.append(f"with a {seal['color']} seal on the {COLUMNS[seal['cell'][1]]}")
    return " ".join(parts)


def question_for(document: dict, rng: np.random.Generator) -> tuple[str, str]:
    """Draws a question type uniformly and returns `(question, answer)`.

    Questions about a missing signature or seal become "is the document signed/sealed".
    """
    kind = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    signature, seal = document["signature"], document["seal"]
    if kind == "clauses":
        return "how many clauses does the document have", COUNTS[len(document["clauses"]) - 1]
    if kind in ("signed", "signature_row", "ink") and (kind == "signed" or signature is None):
        return "is the document signed", "yes" if signature is not None else "no"
    if kind in ("sealed", "seal_side", "seal_color") and (kind == "sealed" or seal is None):
        return "is the document sealed", "yes" if seal is not None else "no"
    if kind == "signature_row":
        return "where is the signature", ROWS[signature["cell"][0]]
    if kind == "ink":
        return "what color ink is the signature", signature["ink"]
    if kind == "seal_side":
        return "which side is the seal on", COLUMNS[seal["cell"][1]]
    return "what color is the seal", seal["color"]


CELLS = tuple((r, c) for r in range(len(ROWS)) for c in range(len(COLUMNS)))


def scene(rng: np.random.Generator) -> dict:
    """One to three clause blocks, and maybe a signature and a seal, each in a cell of its own."""
    num_clauses = int(rng.integers(1, 4))
    signed, sealed = rng.random() < 0.6, rng.random() < 0.6
    order = [CELLS[i] for i in rng.permutation(len(CELLS))]
    signature = {"cell": order[num_clauses], "ink": list(INKS)[rng.integers(len(INKS))]} if signed else None
    seal = {"cell": order[num_clauses + 1], "color": list(SEALS)[rng.integers(len(SEALS))]} if sealed else None
    return {"clauses": sorted(order[:num_clauses]), "signature": signature, "seal": seal}


load = ProceduralDataset(
    domain="legal", scene=scene, question=question_for, caption=caption_for, render=render, extra_key="document"
)
