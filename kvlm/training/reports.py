"""Classification reports: accuracy, macro precision / recall / F1 and a per-domain table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1")


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1.

    Classes are those present in `y_true` or `y_pred`; a class with no predicted
    (or no true) examples has precision (recall) 0, and F1 0 when both are 0.
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"`y_true` and `y_pred` differ in length: {y_true.shape[0]} vs {y_pred.shape[0]}.")
    if y_true.size == 0:
        raise ValueError("Cannot score zero examples.")
    classes = np.union1d(y_true, y_pred)
    true_pos = np.array([np.sum((y_pred == c) & (y_true == c)) for c in classes], dtype=np.float64)
    predicted = np.array([np.sum(y_pred == c) for c in classes], dtype=np.float64)
    actual = np.array([np.sum(y_true == c) for c in classes], dtype=np.float64)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], domains: Sequence[str] | None = None
) -> dict[str, Any]:
    """Overall metrics plus `examples`, and `per_domain` -> {domain: metrics + examples}."""
    report: dict[str, Any] = classification_metrics(y_true, y_pred) | {"examples": len(y_true)}
    if domains is not None:
        domains = np.asarray(list(domains))
        if len(domains) != len(y_true):
            raise ValueError(f"`domains` has {len(domains)} entries for {len(y_true)} examples.")
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        report["per_domain"] = {
            str(d): classification_metrics(y_true[domains == d], y_pred[domains == d])
            | {"examples": int(np.sum(domains == d))}
            for d in sorted(set(domains.tolist()))
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text summary and per-domain table of a `classification_report`."""
    lines = [f"{name:>16}: {report[name]:.4f}" for name in ("loss", *METRICS) if name in report]
    lines.append(f"{'examples':>16}: {report['examples']}")
    rows = report.get("per_domain") or {}
    if rows:
        width = max(len("domain"), *(len(d) for d in rows))
        header = f"{'domain':<{width}}  {'examples':>8}  " + "  ".join(f"{m:>15}" for m in METRICS)
        lines += ["", header, "-" * len(header)]
        for domain, row in rows.items():
            lines.append(
                f"{domain:<{width}}  {row['examples']:>8}  " + "  ".join(f"{row[m]:>15.4f}" for m in METRICS)
            )
    return "\n".join(lines)
