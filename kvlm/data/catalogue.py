"""Procedural product catalogues ("catalogue"): answers that are in a knowledge base, not in the image.

A product is one shapes object: a size, a colour and a shape (2 x 4 x 3 = 24 products).
A catalogue gives every product a price and an aisle, drawn from the catalogue's seed:
each seed is another store, or the same store after its prices changed. An example shows
one product (alone, anywhere on the shelf) and asks for its price or its aisle, so the
answer can only come from the catalogue the model reads: the image tells which product,
the question which field, the catalogue the value.

Held-out examples use catalogue seeds that no training example used, so a model that
memorised the training catalogues answers them at chance (1/8 for prices, 1/4 for aisles).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence

import numpy as np

from kvlm.data import shapes
from kvlm.data.example import Example

PRODUCTS = tuple(
    {"size": size, "color": color, "shape": shape}
    for size, color, shape in itertools.product(shapes.SIZES, shapes.COLORS, shapes.SHAPES)
)
PRICES = ("2", "3", "4", "5", "6", "7", "8", "9")
AISLES = ("north", "south", "east", "west")
FIELDS = ("price", "aisle")
QUESTIONS = {
    "price": ("how much does this cost", "what is the price of this product", "what does this cost"),
    "aisle": ("which aisle is this in", "where is this product stocked", "in which aisle can i find this"),
}
ANSWERS = tuple(sorted(PRICES + AISLES))


def product_key(product: dict) -> str:
    """The product's name, e.g. `"a large red circle"`: what a retrieval index embeds."""
    return f"a {product['size']} {product['color']} {product['shape']}"


def entry_text(product: dict, price: str, aisle: str) -> str:
    """A catalogue entry, e.g. `"the large red circle costs 7 dollars in the north aisle"`."""
    return f"the {product['size']} {product['color']} {product['shape']} costs {price} dollars in the {aisle} aisle"


def keys() -> list[str]:
    """The product names in product order (the same for every catalogue)."""
    return [product_key(p) for p in PRODUCTS]


def _catalogue_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(b"catalogue")])


def catalogue_fields(seed: int) -> list[dict[str, str]]:
    """`[{"price", "aisle"}]` of every product (in product order) in catalogue `seed`."""
    rng = _catalogue_rng(seed)
    prices = rng.integers(len(PRICES), size=len(PRODUCTS))
    aisles = rng.integers(len(AISLES), size=len(PRODUCTS))
    return [{"price": PRICES[p], "aisle": AISLES[a]} for p, a in zip(prices, aisles)]


def catalogue(seed: int) -> list[str]:
    """The entry texts of catalogue `seed`, one per product in product order."""
    return [entry_text(p, f["price"], f["aisle"]) for p, f in zip(PRODUCTS, catalogue_fields(seed))]


def generate(
    size: int, seed: int, catalogue_seeds: Sequence[int], image_size: int = 32
) -> list[Example]:
    """`size` examples, each about a product of one of `catalogue_seeds` (drawn uniformly).

    `Example.caption` is the product's key (`product_key`), so the same examples train a
    dual encoder to retrieve entries; `extra` holds `catalogue` (the seed) and `product`
    (the index into `PRODUCTS`, which is also the entry's index in its catalogue).
    """
    if size < 0:
        raise ValueError(f"`size` must be >= 0. Received: size={size}")
    catalogue_seeds = [int(s) for s in catalogue_seeds]
    if not catalogue_seeds:
        raise ValueError("`catalogue_seeds` is empty: examples need at least one catalogue.")
    if image_size < 24:
        raise ValueError(f"`image_size` must be >= 24 to draw products. Received: image_size={image_size}")
    fields = {s: catalogue_fields(s) for s in set(catalogue_seeds)}
    rng = np.random.default_rng([int(seed), zlib.crc32(b"catalogue-examples")])
    examples = []
    for _ in range(size):
        store = catalogue_seeds[rng.integers(len(catalogue_seeds))]
        index = int(rng.integers(len(PRODUCTS)))
        product = PRODUCTS[index]
        field = FIELDS[rng.integers(len(FIELDS))]
        question = QUESTIONS[field][rng.integers(len(QUESTIONS[field]))]
        position = shapes.POSITIONS[rng.integers(len(shapes.POSITIONS))]
        image = shapes.render([{**product, "position": position}], image_size, rng)
        examples.append(
            Example(
                question=question,
                answer=fields[store][index][field],
                caption=product_key(product),
                image=image,
                domain="catalogue",
                extra={"catalogue": store, "product": index, "field": field},
            )
        )
    return examples


def vocabulary_texts(catalogue_seeds: Sequence[int] = (0,)) -> list[str]:
    """Every text the task uses (questions, keys, entries), to build a vocabulary from."""
    texts = [q for qs in QUESTIONS.values() for q in qs] + keys()
    for s in catalogue_seeds:
        texts += catalogue(s)
    # Every price and aisle word appears in some entry of any catalogue with all values;
    # add one entry per value so the vocabulary never depends on the draw.
    texts += [entry_text(PRODUCTS[0], p, a) for p, a in zip(PRICES, itertools.cycle(AISLES))]
    return texts


def retrieved_contexts(examples: Sequence[Example], entry_ids, tokenizer) -> np.ndarray:
    """`(n, k, length)` token ids of the retrieved entries, each from its example's own catalogue.

    `entry_ids` `(n, k)` are entry (product) indices, e.g. from `KnowledgeIndex.search` over an
    index of `keys()`: the keys are the same in every catalogue, so one index ranks the entries
    of all of them. `tokenizer` gives the reader's `context_length` ids per entry.
    """
    entry_ids = np.asarray(entry_ids)
    if entry_ids.ndim != 2 or len(entry_ids) != len(examples):
        raise ValueError(f"`entry_ids` must have shape ({len(examples)}, k). Received shape {entry_ids.shape}")
    stores = sorted({e.extra["catalogue"] for e in examples})
    tables = {s: np.asarray(tokenizer(catalogue(s)), np.int32) for s in stores}
    return np.stack([tables[e.extra["catalogue"]][ids] for e, ids in zip(examples, entry_ids)])
