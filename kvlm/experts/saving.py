"""Loading `.keras` files whose classes come from plugins, with a `pip install` hint when one is missing."""

from __future__ import annotations

import importlib
import json
import os
import re
import zipfile
from typing import Any

from kvlm.experts.discovery import BUILTIN_DISTRIBUTION, Registry, describe, registry
from kvlm.experts.messages import missing_plugin_class

_REGISTERED_NAME = re.compile(r"""['"]registered_name['"]:\s*['"]([^'"]+>[^'"]+)['"]""")


def _registered_objects(path: str) -> set[tuple[str, str]]:
    """`(registered_name, module)` of every custom object in a `.keras` archive's config."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    found: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            registered = node.get("registered_name")
            if isinstance(registered, str) and ">" in registered:
                found.add((registered, str(node.get("module") or "")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def _ensure_registered(objects: set[tuple[str, str]], reg: Registry, custom_objects: dict | None) -> None:
    """Imports the plugin modules defining the archive's custom classes, or raises ImportError."""
    import keras

    for registered_name, module in sorted(objects):
        if custom_objects and registered_name in custom_objects:
            continue
        if keras.saving.get_registered_object(registered_name) is not None:
            continue
        package = registered_name.split(">", 1)[0]
        if module and module.split(".")[0] in reg.packages:
            # Only modules of discovered plugins (or kvlm) are imported, never arbitrary names.
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ImportError(f"{missing_plugin_class(registered_name, reg)} ({describe(error)})") from error
            if keras.saving.get_registered_object(registered_name) is not None:
                continue
            if package in reg.packages and package != BUILTIN_DISTRIBUTION:
                distribution = reg.packages[package]
                raise ImportError(
                    f"The model needs {registered_name!r}, but the installed {distribution} does not register it; "
                    f"the model was probably saved with another version: pip install --upgrade {distribution}"
                )
        if package == BUILTIN_DISTRIBUTION:
            continue  # A kvlm class: Keras reports it precisely.
        raise ImportError(missing_plugin_class(registered_name, reg))


def load_model(path: str | os.PathLike, custom_objects: dict | None = None, compile: bool = True,
               safe_mode: bool = True):
    """`keras.saving.load_model` after registering the classes of every discovered plugin.

    Raises:
        ImportError: the model needs a class from a plugin that is not installed (or is
            disabled); the message names the distribution to `pip install`.
    """
    import keras

    reg = registry()
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        _ensure_registered(_registered_objects(path), reg, custom_objects)
    try:
        return keras.saving.load_model(path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
    except (TypeError, ValueError) as error:
        match = _REGISTERED_NAME.search(str(error))
        if match and keras.saving.get_registered_object(match.group(1)) is None:
            raise ImportError(missing_plugin_class(match.group(1), reg)) from error
        raise
