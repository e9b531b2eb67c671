"""kvlm-legal: a low-rank + feed-forward expert and a procedural document dataset for kvlm.

The builder and the dataset are named by `"module:attr"` references, so registering
imports neither Keras nor NumPy.
"""

from __future__ import annotations

import kvlm

__version__ = "0.1.0"

# Domain words of the dataset's questions and answers, added to the tokenizer.
VOCABULARY = (
    "document", "clause", "clauses", "signature", "signed", "seal", "sealed", "ink",
    "top", "middle", "bottom", "left", "right", "side", "red", "gold", "green", "blue", "black",
)


@kvlm.hookimpl
def kvlm_register_experts():
    return [
        kvlm.ExpertSpec(
            name="legal",
            domain="legal",
            build="kvlm_legal.layers:LegalExpert",
            version=__version__,
            description="Feed-forward expert with a parallel low-rank linear path for document tokens.",
            vocabulary=VOCABULARY,
            # Trained against the shipped base kvlm_tiny_vqa (scripts/release_experts.py).
            trained="expert",
        )
    ]


@kvlm.hookimpl
def kvlm_register_datasets():
    return [
        kvlm.DatasetSpec(
            name="legal_documents",
            domain="legal",
            description="Procedural documents with clause blocks, signatures and seals.",
            load="kvlm_legal.dataset:load",
        )
    ]
