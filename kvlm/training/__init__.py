"""The training loop every task shares, evaluation, distribution strategies, callbacks and reports."""

from kvlm.runs import Run, TrainConfig, load_run
from kvlm.training.callbacks import BackupAndRestore, NaNGuard, NonFiniteLossError, TrainingCurves
from kvlm.training.distribution import STRATEGIES, Distribution, make_distribution
from kvlm.training.evaluation import evaluate
from kvlm.training.examples import load_examples
from kvlm.training.loop import fit
from kvlm.training.reports import classification_report, format_report
from kvlm.training.routing import RoutingReport, format_routing_report, routing_report, save_routing_heatmap

__all__ = [
    "STRATEGIES",
    "BackupAndRestore",
    "Distribution",
    "NaNGuard",
    "NonFiniteLossError",
    "RoutingReport",
    "Run",
    "TrainConfig",
    "TrainingCurves",
    "classification_report",
    "evaluate",
    "fit",
    "format_report",
    "format_routing_report",
    "load_examples",
    "load_run",
    "make_distribution",
    "routing_report",
    "save_routing_heatmap",
]
