"""kvlm-legal: a low-rank + feed-forward expert and a procedural document dataset for kvlm.

Importing this module is cheap: Keras and NumPy load when an expert is built or the
dataset is generated.
"""

from __future__ import annotations

from typing import Any

import kvlm

__version__ = "0.1.0"

# Domain words of the dataset's questions and answers, added to the tokenizer.
VOCABULARY = (
    "document", "clause", "clauses", "signature", "signed", "seal", "sealed", "ink",
    "top", "middle", "bottom", "left", "right", "side", "red", "gold", "green", "blue", "black",
)


def build_expert(d_model: int, **options):
    """`ExpertSpec.build`: a `LegalExpert` of width `d_model`."""
    from kvlm_legal.layers import LegalExpert

    return LegalExpert(d_model=d_model, **options)


def load_dataset(split: str, size: int, seed: int, image_size: int = 32):
    """`DatasetSpec.load`: procedural documents, see `kvlm_legal.dataset`."""
    from kvlm_legal.dataset import generate

    return generate(size, seed=seed, split=split, image_size=image_size)


@kvlm.hookimpl
def kvlm_register_experts():
    return [
        kvlm.ExpertSpec(
            name="legal",
            domain="legal",
            build=build_expert,
            version=__version__,
            description="Feed-forward expert with a parallel low-rank linear path for document tokens.",
            vocabulary=VOCABULARY,
        )
    ]


@kvlm.hookimpl
def kvlm_register_datasets():
    return [
        kvlm.DatasetSpec(
            name="legal_documents",
            domain="legal",
            description="Procedural documents with clause blocks, signatures and seals.",
            load=load_dataset,
        )
    ]


def __getattr__(name: str) -> Any:
    if name == "LegalExpert":
        from kvlm_legal.layers import LegalExpert

        return LegalExpert
    raise AttributeError(f"module 'kvlm_legal' has no attribute {name!r}")
