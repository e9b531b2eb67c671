"""kvlm-medical: a gated feed-forward expert and a procedural scan dataset for kvlm.

Importing this module is cheap: Keras and NumPy load when an expert is built or the
dataset is generated.
"""

from __future__ import annotations

from typing import Any

import kvlm

__version__ = "0.1.0"

# Domain words of the dataset's questions and answers, added to the tokenizer.
VOCABULARY = (
    "scan", "lesion", "lesions", "tumor", "cyst", "nodule", "organ",
    "lung", "heart", "liver", "stomach", "small", "large", "left", "right", "side",
)


def build_expert(d_model: int, **options):
    """`ExpertSpec.build`: a `MedicalExpert` of width `d_model`."""
    from kvlm_medical.layers import MedicalExpert

    return MedicalExpert(d_model=d_model, **options)


def load_dataset(split: str, size: int, seed: int, image_size: int = 32):
    """`DatasetSpec.load`: procedural scans, see `kvlm_medical.dataset`."""
    from kvlm_medical.dataset import generate

    return generate(size, seed=seed, split=split, image_size=image_size)


@kvlm.hookimpl
def kvlm_register_experts():
    return [
        kvlm.ExpertSpec(
            name="medical",
            domain="medical",
            build=build_expert,
            version=__version__,
            description="Gated (GLU) feed-forward expert for medical imaging tokens.",
            vocabulary=VOCABULARY,
        )
    ]


@kvlm.hookimpl
def kvlm_register_datasets():
    return [
        kvlm.DatasetSpec(
            name="medical_scans",
            domain="medical",
            description="Procedural scans with lesions: count, organ, size, kind and side questions.",
            load=load_dataset,
        )
    ]


def __getattr__(name: str) -> Any:
    if name == "MedicalExpert":
        from kvlm_medical.layers import MedicalExpert

        return MedicalExpert
    raise AttributeError(f"module 'kvlm_medical' has no attribute {name!r}")
