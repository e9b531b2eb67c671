"""Training and evaluation entry points, distribution strategies, callbacks and reports."""

from kvlm.training.callbacks import BackupAndRestore, NaNGuard, NonFiniteLossError, TrainingCurves
from kvlm.training.distribution import STRATEGIES, Distribution, make_distribution
from kvlm.training.reports import classification_report, format_report
from kvlm.training.routing import RoutingReport, format_routing_report, routing_report, save_routing_heatmap
from kvlm.training.run import TrainConfig, evaluate, fit, load_examples, load_run, train
from kvlm.training.tasks import TASKS, evaluate_task, fit_task, format_task_report

__all__ = [
    "STRATEGIES",
    "TASKS",
    "BackupAndRestore",
    "Distribution",
    "NaNGuard",
    "NonFiniteLossError",
    "RoutingReport",
    "TrainConfig",
    "TrainingCurves",
    "classification_report",
    "evaluate",
    "evaluate_task",
    "fit",
    "fit_task",
    "format_report",
    "format_routing_report",
    "format_task_report",
    "load_examples",
    "load_run",
    "make_distribution",
    "routing_report",
    "save_routing_heatmap",
    "train",
]
