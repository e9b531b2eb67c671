"""kvlm-retail: a key-value memory expert and a procedural shelf dataset for kvlm.

Importing this module is cheap: Keras and NumPy load when an expert is built or the
dataset is generated.
"""

from __future__ import annotations

from typing import Any

import kvlm

__version__ = "0.1.0"

# Domain words of the dataset's questions and answers, added to the tokenizer.
VOCABULARY = (
    "shelf", "shelves", "product", "products", "box", "bottle", "can", "sale", "price", "tag",
    "top", "bottom", "left", "middle", "right", "red", "green", "blue", "purple", "zero",
)


def build_expert(d_model: int, **options):
    """`ExpertSpec.build`: a `RetailExpert` of width `d_model`."""
    from kvlm_retail.layers import RetailExpert

    return RetailExpert(d_model=d_model, **options)


def load_dataset(split: str, size: int, seed: int, image_size: int = 32):
    """`DatasetSpec.load`: procedural shelves, see `kvlm_retail.dataset`."""
    from kvlm_retail.dataset import generate

    return generate(size, seed=seed, split=split, image_size=image_size)


@kvlm.hookimpl
def kvlm_register_experts():
    return [
        kvlm.ExpertSpec(
            name="retail",
            domain="retail",
            build=build_expert,
            version=__version__,
            description="Key-value memory expert: each token reads a softmax mix of learned product slots.",
            vocabulary=VOCABULARY,
        )
    ]


@kvlm.hookimpl
def kvlm_register_datasets():
    return [
        kvlm.DatasetSpec(
            name="retail_shelves",
            domain="retail",
            description="Procedural store shelves with products and price tags.",
            load=load_dataset,
        )
    ]


def __getattr__(name: str) -> Any:
    if name == "RetailExpert":
        from kvlm_retail.layers import RetailExpert

        return RetailExpert
    raise AttributeError(f"module 'kvlm_retail' has no attribute {name!r}")
