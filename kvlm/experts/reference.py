"""Lazy `"module:attr"` references, so a plugin names its builders without importing Keras."""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class Reference:
    """A callable named by `"package.module:attr"`, imported on first call.

    Args:
        target: `"module:attr"`, e.g. `"kvlm_medical.layers:MedicalExpert"`; `attr`
            may be dotted (`"module:Class.method"`).
    """

    target: str

    def __post_init__(self):
        if not isinstance(self.target, str) or not _TARGET.match(self.target):
            raise ValueError(
                f'A reference must look like "package.module:attr". Received: target={self.target!r}'
            )

    @property
    def module(self) -> str:
        """The module the target lives in (imported on first use)."""
        return self.target.split(":", 1)[0]

    def resolve(self) -> Any:
        """Imports the module and returns the named object."""
        value: Any = importlib.import_module(self.module)
        for part in self.target.split(":", 1)[1].split("."):
            value = getattr(value, part)
        return value

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.resolve())

    def __str__(self) -> str:
        return self.target


def callable_or_reference(kind: str, field: str, value: Any):
    """`value` if callable, a `Reference` if a `"module:attr"` string; else ValueError."""
    if isinstance(value, str) and _TARGET.match(value):
        return Reference(value)
    if callable(value) and not isinstance(value, str):
        return value
    raise ValueError(f'`{kind}.{field}` must be callable or a "module:attr" string. Received: {field}={value!r}')
