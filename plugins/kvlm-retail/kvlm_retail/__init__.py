"""kvlm-retail: a key-value memory expert and a procedural shelf dataset for kvlm.

The builder and the dataset are named by `"module:attr"` references, so registering
imports neither Keras nor NumPy.
"""

from __future__ import annotations

import kvlm

__version__ = "0.1.0"

# Domain words of the dataset's questions and answers, added to the tokenizer.
VOCABULARY = (
    "shelf", "shelves", "product", "products", "box", "bottle", "can", "sale", "price", "tag",
    "top", "bottom", "left", "middle", "right", "red", "green", "blue", "purple", "zero",
)


@kvlm.hookimpl
def kvlm_register_experts():
    return [
        kvlm.ExpertSpec(
            name="retail",
            domain="retail",
            build="kvlm_retail.layers:RetailExpert",
            version=__version__,
            description="Key-value memory expert: each token reads a softmax mix of learned product slots.",
            vocabulary=VOCABULARY,
            # Trained against the shipped base kvlm_tiny_vqa (scripts/release_experts.py).
            trained="expert",
        )
    ]


@kvlm.hookimpl
def kvlm_register_datasets():
    return [
        kvlm.DatasetSpec(
            name="retail_shelves",
            domain="retail",
            description="Procedural store shelves with products and price tags.",
            load="kvlm_retail.dataset:load",
        )
    ]
