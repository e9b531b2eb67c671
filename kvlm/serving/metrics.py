"""Prometheus metrics under TF Serving's names, plus kvlm's own.

TF Serving's (same names and labels as `tensorflow_model_server` exports):
    :tensorflow:serving:request_count{model_name, status}
    :tensorflow:serving:request_latency{model_name, API, entrypoint}  (histogram, microseconds)
    :tensorflow:serving:batching_session:processed_batch_size{model_name}  (histogram)
    :tensorflow:cc:saved_model:load_attempt_count{model_path, status}
kvlm's:
    :kvlm:serving:error_count{model_name, API, code}
    :kvlm:serving:rejected_image_count{model_name, reason}
    :kvlm:serving:expert_answer_count{model_name, expert}  (models whose signature returns `expert`)

TF Serving writes its counters without the `_total` suffix that `prometheus_client`
adds to counter families, so counters are exposed untyped under their exact names.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# TF Serving's request latency buckets: 10 us times 1.8^i, 33 buckets.
LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(33))
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_COUNTERS = {
    "request_count": (":tensorflow:serving:request_count", "The total number of requests.", ("model_name", "status")),
    "load_attempt_count": (":tensorflow:cc:saved_model:load_attempt_count",
                           "The number of times a SavedModel was successfully loaded.", ("model_path", "status")),
    "error_count": (":kvlm:serving:error_count", "Failed requests by gRPC status code.", ("model_name", "API", "code")),
    "rejected_image_count": (":kvlm:serving:rejected_image_count",
                             "Requests refused by the image size or decode memory limits.", ("model_name", "reason")),
    "expert_answer_count": (":kvlm:serving:expert_answer_count", "Examples answered, by the expert that answered.",
                            ("model_name", "expert")),
}
_HISTOGRAMS = {
    "request_latency": (":tensorflow:serving:request_latency", "Distribution of wall time (in microseconds) for "
                        "Tensorflow Serving request.", ("model_name", "API", "entrypoint"), LATENCY_BUCKETS_US),
    "processed_batch_size": (":tensorflow:serving:batching_session:processed_batch_size",
                             "Tracks the batch size distribution on processing.", ("model_name",), BATCH_SIZE_BUCKETS),
}


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


class Metrics:
    """Thread-safe counters and histograms, read by Prometheus through `exposition()`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {key: defaultdict(float) for key in _COUNTERS}
        self._histograms: dict[str, dict[tuple, _Histogram]] = {key: {} for key in _HISTOGRAMS}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def count(self, key: str, *labels: str, value: float = 1) -> None:
        with self._lock:
            self._counters[key][labels] += value

    def observe(self, key: str, value: float, *labels: str) -> None:
        with self._lock:
            series = self._histograms[key]
            if labels not in series:
                series[labels] = _Histogram(_HISTOGRAMS[key][3])
            series[labels].observe(value)

    def request(self, model_name: str, api: str, entrypoint: str, code: str, seconds: float) -> None:
        """Records one finished request (`code` is the gRPC status name, e.g. "OK")."""
        self.count("request_count", model_name, code)
        if code != "OK":
            self.count("error_count", model_name, api, code)
        self.observe("request_latency", seconds * 1e6, model_name, api, entrypoint)

    def value(self, key: str, *labels: str) -> float:
        """A counter's current value (0 when never counted)."""
        with self._lock:
            return self._counters[key].get(labels, 0.0)

    def collect(self):
        with self._lock:
            for key, (name, documentation, label_names) in _COUNTERS.items():
                metric = Metric(name, documentation, "unknown")
                for labels, value in sorted(self._counters[key].items()):
                    metric.add_sample(name, dict(zip(label_names, labels)), value)
                yield metric
            for key, (name, documentation, label_names, buckets) in _HISTOGRAMS.items():
                family = HistogramMetricFamily(name, documentation, labels=label_names)
                for labels, histogram in sorted(self._histograms[key].items()):
                    cumulative, total = [], 0
                    for bound, count in zip([*(f"{b:.6g}" for b in buckets), "+Inf"], histogram.counts):
                        total += count
                        cumulative.append((bound, total))
                    family.add_metric(list(labels), cumulative, histogram.sum)
                yield family

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)
