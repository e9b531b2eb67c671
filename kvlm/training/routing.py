"""Routing reports: which experts each domain's tokens go to in a trained MoE model.

`routing_report` runs the `SparseMoE` layers of a `VLMClassifier` (or `VLMBackbone`)
over held-out examples and counts, per MoE layer, the real (non-padding) tokens of
each domain that every expert processes. `format_routing_report` prints the
fractions as a table and `save_routing_heatmap` draws them as a PNG heatmap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from kvlm.data.example import Example
from kvlm.layers.fusion import FusionBlock
from kvlm.layers.moe import SparseMoE


@dataclass(frozen=True)
class LayerRouting:
    """Routing counts of one `SparseMoE` layer.

    Attributes:
        name: The layer's name, e.g. `"moe_1"`.
        experts: Expert names in routing order.
        top_k: Experts per token of the layer.
        counts: int `(domains, experts)`: real tokens of each domain each expert
            processed (a token routed to k experts counts k times; tokens over
            capacity count nowhere).
    """

    name: str
    experts: tuple[str, ...]
    top_k: int
    counts: np.ndarray

    @property
    def fractions(self) -> np.ndarray:
        """float `(domains, experts)`: each row is one domain's routed tokens split by expert.

        Rows sum to 1; a domain with no routed token has a row of zeros.
        """
        counts = np.asarray(self.counts, dtype=np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


@dataclass(frozen=True)
class RoutingReport:
    """Per-domain routing of every `SparseMoE` layer of a model.

    Attributes:
        domains: Domain names, the row order of every table.
        tokens: int `(domains,)`: real (non-padding) tokens seen per domain.
        examples: int `(domains,)`: examples seen per domain.
        layers: One `LayerRouting` per MoE layer, in model order.
    """

    domains: tuple[str, ...]
    tokens: np.ndarray
    examples: np.ndarray
    layers: tuple[LayerRouting, ...]

    @property
    def fractions(self) -> dict[str, np.ndarray]:
        """Layer name -> `(domains, experts)` fraction of each domain's routed tokens per expert."""
        return {layer.name: layer.fractions for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable form (`from_dict` reads it back)."""
        return {
            "domains": list(self.domains),
            "tokens": {d: int(n) for d, n in zip(self.domains, self.tokens)},
            "examples": {d: int(n) for d, n in zip(self.domains, self.examples)},
            "layers": [
                {
                    "name": layer.name,
                    "experts": list(layer.experts),
                    "top_k": layer.top_k,
                    "counts": {d: [int(c) for c in row] for d, row in zip(self.domains, layer.counts)},
                    "fractions": {d: [float(f) for f in row] for d, row in zip(self.domains, layer.fractions)},
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutingReport":
        """Reads the form written by `to_dict`."""
        domains = tuple(data["domains"])
        return cls(
            domains=domains,
            tokens=np.array([data["tokens"][d] for d in domains], dtype=np.int64),
            examples=np.array([data["examples"][d] for d in domains], dtype=np.int64),
            layers=tuple(
                LayerRouting(
                    name=layer["name"],
                    experts=tuple(layer["experts"]),
                    top_k=int(layer["top_k"]),
                    counts=np.array([layer["counts"][d] for d in domains], dtype=np.int64).reshape(
                        len(domains), len(layer["experts"])
                    ),
                )
                for layer in data["layers"]
            ),
        )

    def save_json(self, path: str | Path) -> Path:
        """Writes `to_dict()` as JSON to `path` and returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path


def moe_blocks(model: keras.Model) -> list[tuple[FusionBlock, SparseMoE]]:
    """The `(FusionBlock, SparseMoE)` pairs of a classifier's (or backbone's) fusion stack."""
    backbone = getattr(model, "backbone", model)
    return [
        (layer, layer.ffn)
        for layer in backbone.layers
        if isinstance(layer, FusionBlock) and isinstance(layer.ffn, SparseMoE)
    ]


def moe_input(block: FusionBlock, x, padding_mask):
    """What `block` feeds its feed-forward layer at inference: `ffn_norm(x + attention(attention_norm(x)))`.

    Mirrors the first half of `FusionBlock.call` with `training=False`.
    """
    attention_mask = ops.expand_dims(ops.cast(padding_mask, "bool"), 1)
    h = block.attention_norm(x)
    h = block.attention(h, h, attention_mask=attention_mask, training=False)
    return block.ffn_norm(x + h)


def _example_batches(
    examples: Sequence[Example], tokenizer, image_size: int, batch_size: int
) -> Iterable[tuple[dict[str, np.ndarray], list[str]]]:
    """`(features, domains)` batches built with the training input pipeline (same preprocessing)."""
    from kvlm.data import answer_vocabulary, make_dataset

    data = make_dataset(examples, tokenizer, answer_vocabulary(examples), image_size, batch_size)
    start = 0
    for features, _ in data.as_numpy_iterator():
        size = len(features["token_ids"])
        yield features, [e.domain for e in examples[start : start + size]]
        start += size


def routing_report(
    model: keras.Model,
    dataset_or_examples: Sequence[Example] | Iterable[tuple[dict[str, Any], Sequence[str]]],
    tokenizer=None,
    *,
    batch_size: int = 128,
    domains: Sequence[str] | None = None,
) -> RoutingReport:
    """Counts, per `SparseMoE` layer, where each domain's real tokens are routed.

    The model runs in inference mode up to each MoE layer; the layer's router
    (with its inference capacity) then routes the real tokens of each domain
    in the batch on their own, through `SparseMoE.routing_counts` with a mask
    of that domain's non-padding tokens ([CLS], image and text tokens; text
    padding never counts).

    Args:
        model: A `VLMClassifier` or `VLMBackbone` with SparseMoE fusion blocks.
        dataset_or_examples: Held-out `kvlm.data.Example`s (each with its
            `domain`), preprocessed like training data with `tokenizer`; or an
            iterable of `(features, domains)` batches where `features` has
            `"images"` (float `(batch, H, W, 3)` in [0, 1]) and `"token_ids"`
            and `domains` names each example's domain.
        tokenizer: The run's tokenizer; needed for examples.
        batch_size: Examples per forward pass (examples only).
        domains: Row order of the tables; default: the sorted domains seen.

    Returns:
        A `RoutingReport`; `report.fractions[layer]` is the `(domains, experts)`
        table of the fraction of each domain's routed tokens per expert.

    Raises:
        ValueError: The model has no SparseMoE layer, examples come without a
            tokenizer, no example was given, or a domain is not in `domains`.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("The model has no SparseMoE layer: build it with `moe=` to get a routing report.")
    backbone = getattr(model, "backbone", model)
    if isinstance(dataset_or_examples, Sequence) and dataset_or_examples and isinstance(
        dataset_or_examples[0], Example
    ):
        if tokenizer is None:
            raise ValueError("`routing_report` needs the run's `tokenizer` to preprocess examples.")
        batches = _example_batches(dataset_or_examples, tokenizer, backbone.image_size, batch_size)
    else:
        batches = dataset_or_examples

    outputs = backbone.output
    features_model = keras.Model(
        backbone.input, [block.input[0] for block, _ in blocks] + [outputs["padding_mask"]]
    )
    counts: dict[str, list[np.ndarray]] = {}
    tokens: dict[str, int] = {}
    examples: dict[str, int] = {}
    for features, batch_domains in batches:
        features = {
            "images": ops.convert_to_tensor(np.asarray(features["images"], dtype="float32")),
            "token_ids": ops.convert_to_tensor(np.asarray(features["token_ids"], dtype="int32")),
        }
        batch_domains = np.asarray([str(d) for d in batch_domains])
        *block_inputs, padding_mask = features_model(features, training=False)
        padding_mask = np.asarray(ops.convert_to_numpy(padding_mask), dtype=bool)
        if len(batch_domains) != len(padding_mask):
            raise ValueError(f"{len(batch_domains)} domains for a batch of {len(padding_mask)} examples.")
        moe_inputs = [moe_input(block, x, padding_mask) for (block, _), x in zip(blocks, block_inputs)]
        for domain in map(str, np.unique(batch_domains)):
            mask = padding_mask & (batch_domains == domain)[:, None]
            per_layer = [moe.routing_counts(h, mask) for (_, moe), h in zip(blocks, moe_inputs)]
            if domain in counts:
                counts[domain] = [total + c for total, c in zip(counts[domain], per_layer)]
            else:
                counts[domain] = per_layer
            tokens[domain] = tokens.get(domain, 0) + int(mask.sum())
            examples[domain] = examples.get(domain, 0) + int(np.sum(batch_domains == domain))
    if not counts:
        raise ValueError("`routing_report` got no examples.")
    order = tuple(domains) if domains is not None else tuple(sorted(counts))
    missing = sorted(set(counts) - set(order))
    if missing:
        raise ValueError(f"Examples of domains {missing} are not in `domains`={list(order)}.")
    layers = []
    for i, (_, moe) in enumerate(blocks):
        rows = [counts[d][i] if d in counts else np.zeros(moe.num_experts, np.int64) for d in order]
        layers.append(LayerRouting(moe.name, tuple(moe.expert_names), moe.top_k, np.stack(rows).astype(np.int64)))
    return RoutingReport(
        domains=order,
        tokens=np.array([tokens.get(d, 0) for d in order], dtype=np.int64),
        examples=np.array([examples.get(d, 0) for d in order], dtype=np.int64),
        layers=tuple(layers),
    )


def format_routing_report(report: RoutingReport) -> str:
    """A text table per MoE layer: fraction of each domain's routed tokens per expert.

    The last column, `per token`, is routed assignments per real token (top_k
    when no token was dropped for capacity).
    """
    lines = []
    for layer in report.layers:
        if lines:
            lines.append("")
        lines.append(
            f"{layer.name}: fraction of each domain's routed tokens per expert "
            f"(top_k={layer.top_k}, {len(layer.experts)} experts)"
        )
        width = max(len("domain"), *(len(d) for d in report.domains))
        cells = [max(len(e), 6) for e in layer.experts]
        header = f"{'domain':<{width}}  {'tokens':>8}  " + "  ".join(
            f"{e:>{w}}" for e, w in zip(layer.experts, cells)
        ) + f"  {'per token':>9}"
        lines += [header, "-" * len(header)]
        for d, domain in enumerate(report.domains):
            per_token = layer.counts[d].sum() / report.tokens[d] if report.tokens[d] else 0.0
            lines.append(
                f"{domain:<{width}}  {int(report.tokens[d]):>8}  "
                + "  ".join(f"{f:>{w}.3f}" for f, w in zip(layer.fractions[d], cells))
                + f"  {per_token:>9.3f}"
            )
    return "\n".join(lines)


def heatmap_size(report: RoutingReport) -> tuple[float, float]:
    """Default figure size in inches of `save_routing_heatmap`."""
    experts = max(len(layer.experts) for layer in report.layers)
    width = 1.4 + len(report.layers) * (1.6 + 0.8 * experts)
    height = 1.6 + 0.45 * len(report.domains)
    return width, height


def save_routing_heatmap(
    report: RoutingReport,
    path: str | Path,
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Draws one heatmap per MoE layer (domains x experts, fractions annotated) to a PNG.

    Uses matplotlib's Agg canvas (no display needed). The image is exactly
    `figsize * dpi` pixels; `figsize` defaults to `heatmap_size(report)`.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not report.layers:
        raise ValueError("The routing report has no MoE layer to draw.")
    figure = Figure(figsize=figsize or heatmap_size(report), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(report.layers), squeeze=False)[0]
    image = None
    for ax, layer in zip(axes, report.layers):
        fractions = layer.fractions
        image = ax.imshow(fractions, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(layer.experts)), layer.experts, rotation=30, ha="right")
        ax.set_yticks(range(len(report.domains)), report.domains)
        ax.set_xlabel("expert")
        ax.set_title(f"{layer.name} (top-{layer.top_k})")
        for d in range(fractions.shape[0]):
            for e in range(fractions.shape[1]):
                value = fractions[d, e]
                ax.text(e, d, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 else "white")
    axes[0].set_ylabel("domain")
    figure.colorbar(image, ax=list(axes), label="fraction of tokens")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
