"""What a task declares without importing Keras: `TaskInfo` and its `Option`s."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The strategies of a task that trains on one device.
ONE_DEVICE = ("auto", "one_device")
# Sizes every task declares a default for (`TrainConfig` fields left at None take them).
DEFAULT_FIELDS = ("train_size", "eval_size", "epochs", "batch_size", "learning_rate")


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1."""
    number = int(value) if value.strip().isdigit() else 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return number


@dataclass(frozen=True)
class Option:
    """A task-only option: a `TrainConfig.task_options` key and its `kvlm train` flag.

    Attributes:
        name: The key; the flag is `--name-with-dashes`.
        default: Its value when not given.
        help: One line for `kvlm train --help` (the task name is prefixed).
        type: The argparse type of the flag (None: a string).
        choices: Allowed values, or None.
        config_field: Where the flag's value goes instead of `task_options`: a `TrainConfig`
            field (`"preset"`) or an `overrides` key (`"overrides.num_fusion_layers"`).
        cli: Whether `kvlm train` has the flag (False: set by other commands).
    """

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    config_field: str | None = None
    cli: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class TaskInfo:
    """A task as the registry lists it.

    Attributes:
        name: The `--task` value.
        help: One line on what it trains.
        defaults: Values of `DEFAULT_FIELDS` (and other `TrainConfig` fields) for a run that
            leaves them unset; a field missing here must come from elsewhere (e.g. a teacher run).
        options: Its task-only options.
        strategies: The `--strategy` values it trains under.
        refuses: `TrainConfig` fields it cannot take (a run that sets one fails naming it).
        refusal: Why, completing "The <name> task ...: drop --flag".
    """

    name: str
    help: str
    defaults: Mapping[str, Any]
    options: tuple[Option, ...] = ()
    strategies: tuple[str, ...] = ONE_DEVICE
    refuses: tuple[str, ...] = ()
    refusal: str = ""
    _names: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self):
        object.__setattr__(self, "_names", frozenset(o.name for o in self.options if o.config_field is None))

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """`given` over the defaults of the task's options.

        Raises:
            ValueError: `given` names an option the task does not have.
        """
        unknown = sorted(set(given) - self._names)
        if unknown:
            raise ValueError(
                f"The {self.name} task has no option(s) {', '.join(map(repr, unknown))}; its options: "
                f"{', '.join(sorted(self._names)) or 'none'}. Received: task_options={dict(given)!r}"
            )
        defaults = {o.name: o.default for o in self.options if o.config_field is None}
        return {**defaults, **given}

    def refused(self, values: Mapping[str, Any]) -> list[str]:
        """The flags of the refused fields that `values` sets (not None)."""
        return ["--" + name.replace("_", "-") for name in self.refuses if values.get(name) is not None]

    def check_refused(self, values: Mapping[str, Any]) -> None:
        """Raises `ValueError` naming the refused fields that `values` sets."""
        given = self.refused(values)
        if given:
            raise ValueError(f"The {self.name} task {self.refusal}: drop {' and '.join(given)}.")
