"""What to tell the user when an expert or a plugin class is missing: which distribution
to `pip install`, or why an installed one was not loaded."""

from __future__ import annotations

import os
from importlib import metadata

from kvlm.experts.discovery import ALLOW_ENV, DENY_ENV, FIRST_PARTY_EXPERTS, Filters, Registry, canonical


class ExpertNotFoundError(ValueError, LookupError):
    """No discovered expert has the requested name; the message says what to install."""

    def __init__(self, name: str, message: str, distribution: str | None = None):
        super().__init__(message)
        self.name = name
        self.distribution = distribution


def _env_summary() -> str:
    return f"{ALLOW_ENV}={os.environ.get(ALLOW_ENV, '')!r}, {DENY_ENV}={os.environ.get(DENY_ENV, '')!r}"


def _broken_reason(reg: Registry, distribution: str) -> str | None:
    reasons = [r.reason for r in reg.broken if canonical(r.distribution) == canonical(distribution)]
    return "; ".join(reasons) or None


def missing_expert(name: str, reg: Registry, recorded: str | None = None) -> ExpertNotFoundError:
    """The error for an expert name no discovered plugin provides.

    `recorded`: the distribution a saved model recorded for the expert, used when the
    name is not a first-party one.
    """
    names = ", ".join(sorted(reg.experts)) or "none"
    info = reg.disabled.get(name)
    if info is not None:
        return ExpertNotFoundError(
            name,
            f"Expert {name!r} from {info.distribution} is installed but disabled ({_env_summary()}). "
            f"Available experts: {names}.",
            info.distribution,
        )
    distribution = FIRST_PARTY_EXPERTS.get(name, recorded)
    if distribution is None:
        return ExpertNotFoundError(
            name,
            f"Unknown expert {name!r}. Available experts: {names}. "
            "Install the plugin that provides it and check `kvlm experts list`.",
        )
    if Filters.from_env().denies_distribution(distribution):
        message = f"Expert {name!r} comes from {distribution}, which is disabled ({_env_summary()})."
    elif reason := _broken_reason(reg, distribution):
        message = (
            f"Expert {name!r} comes from {distribution}, which is installed but failed to load: {reason}. "
            f"Reinstall it: pip install --force-reinstall {distribution}"
        )
    else:
        message = (
            f"Expert {name!r} is provided by the plugin {distribution}, which is not installed: "
            f"pip install {distribution}"
        )
    return ExpertNotFoundError(name, message, distribution)


def distribution_for_package(package: str, reg: Registry) -> str | None:
    """The distribution that installs the top-level Python package `package`, if known."""
    if package in reg.packages:
        return reg.packages[package]
    installed = metadata.packages_distributions().get(package)
    if installed:
        return installed[0]
    return {dist.replace("-", "_"): dist for dist in FIRST_PARTY_EXPERTS.values()}.get(package)


def missing_plugin_class(registered_name: str, reg: Registry) -> str:
    """The message for a `.keras` class (`"package>Class"`) that no installed plugin registers."""
    package = registered_name.split(">", 1)[0]
    distribution = distribution_for_package(package, reg)
    if distribution is None:
        return (
            f"The model needs {registered_name!r}, registered by the Python package {package!r}, which no "
            "installed kvlm plugin provides. Install the plugin that provides it (pip install <distribution>) "
            "and check `kvlm experts list`."
        )
    if Filters.from_env().denies_distribution(distribution):
        return (
            f"The model needs {registered_name!r} from the plugin {distribution}, which is disabled "
            f"({_env_summary()}). Enable it, or pip install {distribution}."
        )
    reason = _broken_reason(reg, distribution)
    detail = f" (it failed to load: {reason})" if reason else ""
    return (
        f"The model needs {registered_name!r} from the plugin {distribution}, which is not installed{detail}. "
        f"Install it: pip install {distribution}"
    )
