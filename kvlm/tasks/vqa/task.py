"""The vqa task: a `VLMClassifier` answering questions about images, with a routing report for MoE models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras

from kvlm.runs import ROUTING_FILE, ROUTING_PLOT, TrainConfig
from kvlm.tasks.base import ClassifierTask, TrainData
from kvlm.tasks.vqa import INFO
from kvlm.training.distribution import Distribution
from kvlm.training.routing import RoutingReport, format_routing_report, moe_blocks, routing_report, save_routing_heatmap


class VQATask(ClassifierTask):
    """The `VLMClassifier` of `ClassifierTask` with a routing report for SparseMoE models."""

    info = INFO

    def after_training(
        self, config: TrainConfig, data: TrainData, model: keras.Model, out: Path, distribution: Distribution
    ) -> dict[str, Any]:
        """The held-out examples' routing per domain (`routing.json`, `routing.png`) for models with
        SparseMoE layers (not for multi-process JAX runs, whose variables span processes)."""
        if not moe_blocks(model) or (distribution.backend == "jax" and distribution.num_workers > 1):
            return {}
        report = routing_report(model, data.held_out, data.tokenizer)
        report.save_json(out / ROUTING_FILE)
        save_routing_heatmap(report, out / ROUTING_PLOT)
        return {"routing": report.to_dict()}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        lines = super().summary_lines(summary)
        if "routing" in summary:
            out = Path(summary["output"])
            lines += [
                format_routing_report(RoutingReport.from_dict(summary["routing"])),
                f"routing: {out / ROUTING_FILE}, heatmap {out / ROUTING_PLOT}",
            ]
        return lines


TASK = VQATask
