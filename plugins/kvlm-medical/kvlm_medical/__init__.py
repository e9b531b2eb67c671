"""kvlm-medical: a gated feed-forward expert and a procedural scan dataset for kvlm.

The builder and the dataset are named by `"module:attr"` references, so registering
imports neither Keras nor NumPy.
"""

from __future__ import annotations

import kvlm

__version__ = "0.1.0"

# Domain words of the dataset's questions and answers, added to the tokenizer.
VOCABULARY = (
    "scan", "lesion", "lesions", "tumor", "cyst", "nodule", "organ",
    "lung", "heart", "liver", "stomach", "small", "large", "left", "right", "side",
)


@kvlm.hookimpl
def kvlm_register_experts():
    return [
        kvlm.ExpertSpec(
            name="medical",
            domain="medical",
            build="kvlm_medical.layers:MedicalExpert",
            version=__version__,
            description="Gated (GLU) feed-forward expert for medical imaging tokens.",
            vocabulary=VOCABULARY,
            # Trained against the shipped base kvlm_tiny_vqa (scripts/release_experts.py).
            trained="expert",
        )
    ]


@kvlm.hookimpl
def kvlm_register_datasets():
    return [
        kvlm.DatasetSpec(
            name="medical_scans",
            domain="medical",
            description="Procedural scans with lesions: count, organ, size, kind and side questions.",
            load="kvlm_medical.dataset:load",
        )
    ]
