"""The task registry: every training task by name, without importing Keras.

Each task is one package (`kvlm/tasks/<name>/`): its `__init__.py` declares `INFO` (a
`TaskInfo`: help, defaults, options, strategies) and its `task.py` the `Task` subclass
`TASK` (data, model, report, evaluation and export; imports Keras). Adding a task is one
folder and one line in `TASKS`.
"""

from __future__ import annotations

import importlib

from kvlm.tasks.info import ONE_DEVICE, Option, TaskInfo

# The only place that names the tasks.
TASKS = {
    "vqa": "kvlm.tasks.vqa",
    "retrieval": "kvlm.tasks.retrieval",
    "captioning": "kvlm.tasks.captioning",
    "distillation": "kvlm.tasks.distillation",
    "rag": "kvlm.tasks.rag",
    "domain_expert": "kvlm.tasks.domain_expert",
}


def task_names() -> tuple[str, ...]:
    """The registered task names, in registry order."""
    return tuple(TASKS)


def _package(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"`task` must be one of {', '.join(TASKS)}. Received: task={name!r}")
    return TASKS[name]


def task_info(name: str) -> TaskInfo:
    """The `TaskInfo` of a registered task (imports no Keras).

    Raises:
        ValueError: `name` is not a registered task (the message lists them).
    """
    return importlib.import_module(_package(name)).INFO


def get_task(name: str):
    """The `kvlm.tasks.base.Task` of a registered task (imports its Keras code).

    Raises:
        ValueError: `name` is not a registered task (the message lists them).
    """
    return importlib.import_module(f"{_package(name)}.task").TASK()


__all__ = ["ONE_DEVICE", "TASKS", "Option", "TaskInfo", "get_task", "task_info", "task_names"]
