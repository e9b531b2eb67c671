"""The records a plugin returns from its hooks: `ExpertSpec` and `DatasetSpec`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvlm.experts.reference import callable_or_reference

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"`{kind}.name` must be a lowercase identifier such as 'medical' "
            f"(letters, digits, '_' or '-'). Received: name={name!r}"
        )


def _check_text(kind: str, field: str, value: Any, allow_empty: bool = True) -> None:
    if not isinstance(value, str) or (not allow_empty and not value):
        adjective = "" if allow_empty else " non-empty"
        raise ValueError(f"`{kind}.{field}` must be a{adjective} string. Received: {field}={value!r}")


@dataclass(frozen=True)
class ExpertSpec:
    """One expert a plugin provides to the sparse Mixture-of-Experts layer.

    Args:
        name: Unique registry name, e.g. `"medical"`.
        domain: What the expert specialises in, e.g. `"medical"`.
        build: Called as `build(d_model=..., **options)`; returns a Keras layer mapping
            `(..., tokens, d_model)` to the same shape, token by token. A
            `"module:attr"` string (e.g. `"kvlm_medical.layers:MedicalExpert"`) is
            imported on first call, so registering costs no Keras import.
        version: The expert's own version.
        description: One line shown by `kvlm experts list --json`.
        vocabulary: Domain words added to the tokenizer.
        weights: Path of a `.weights.h5` file shipped inside the plugin package; relative
            paths are resolved against the folder of the module defining `build`.
        trained: Folder of a trained expert for a released base (`expert.json`,
            `expert.weights.npz` and, for an adapter expert, `expert.lora.h5`, written by
            `kvlm train --task domain_expert`), shipped
            inside the plugin package and resolved like `weights`. `kvlm.domain_experts.
            install_experts` places it into that base with its router keys; `build` stays
            the architecture for training a Mixture-of-Experts model from scratch.
    """

    name: str
    domain: str
    build: Callable[..., Any] | str
    version: str = "0"
    description: str = ""
    vocabulary: tuple[str, ...] = ()
    weights: str | None = None
    trained: str | None = None

    def __post_init__(self):
        _check_name("ExpertSpec", self.name)
        _check_text("ExpertSpec", "domain", self.domain, allow_empty=False)
        object.__setattr__(self, "build", callable_or_reference("ExpertSpec", "build", self.build))
        _check_text("ExpertSpec", "version", self.version, allow_empty=False)
        _check_text("ExpertSpec", "description", self.description)
        if isinstance(self.vocabulary, str) or not all(isinstance(w, str) and w for w in self.vocabulary):
            raise ValueError(
                "`ExpertSpec.vocabulary` must be a sequence of non-empty strings. "
                f"Received: vocabulary={self.vocabulary!r}"
            )
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
        if self.weights is not None:
            _check_text("ExpertSpec", "weights", str(self.weights), allow_empty=False)
            object.__setattr__(self, "weights", str(self.weights))
        if self.trained is not None:
            _check_text("ExpertSpec", "trained", str(self.trained), allow_empty=False)
            object.__setattr__(self, "trained", str(self.trained))


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset a plugin provides.

    Args:
        name: Unique registry name, e.g. `"medical_scans"`.
        domain: The domain every example carries in `Example.domain`.
        description: One line shown by `kvlm experts list --json`.
        load: Called as `load(split, size, seed)` (optionally with `image_size=`); returns
            a list of `kvlm.data.Example` with uint8 `(H, W, 3)` images. A `"module:attr"`
            string is imported on first call.
    """

    name: str
    domain: str
    description: str
    load: Callable[..., list] | str

    def __post_init__(self):
        _check_name("DatasetSpec", self.name)
        _check_text("DatasetSpec", "domain", self.domain, allow_empty=False)
        _check_text("DatasetSpec", "description", self.description)
        object.__setattr__(self, "load", callable_or_reference("DatasetSpec", "load", self.load))
