"""The hooks a kvlm plugin implements, marked with `kvlm.hookimpl`."""

from __future__ import annotations

import pluggy

PROJECT_NAME = "kvlm"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def kvlm_register_experts() -> list:
    """Returns the `kvlm.ExpertSpec`s this plugin provides."""


@hookspec
def kvlm_register_datasets() -> list:
    """Returns the `kvlm.DatasetSpec`s this plugin provides (optional)."""
