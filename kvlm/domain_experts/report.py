"""A base with experts installed, measured per domain and written as a run folder (`kvlm experts install`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kvlm.data import make_dataset, shapes
from kvlm.domain_experts.base import Base
from kvlm.domain_experts.install import InstalledModel
from kvlm.domain_experts.routing import routing_features
from kvlm.layers import FusionBlock
from kvlm.runs import MODEL_FILE, TrainConfig, write_run_files
from kvlm.training.evaluation import answer_accuracy
from kvlm.training.examples import mix_datasets

GENERAL = "general"


def routing_shares(model: keras.Model, examples: Sequence, tokenizer, answers: Sequence[str], image_size: int,
                   expert_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Share of the examples' real tokens each expert processes, over every SparseMoE block.

    Keys: `all` (as the model routes), `image` and `text` (each sequence routed on its image
    tokens alone / its text tokens alone), and `head` (share of sequences whose answers the
    answer head takes from each expert).
    """
    blocks = [layer for layer in model.layers if isinstance(layer, FusionBlock)]
    head = model.get_layer("answer_head")
    counts = {kind: np.zeros(len(expert_names)) for kind in ("all", "image", "text")}
    heads = np.zeros(len(expert_names))
    for inputs, _ in make_dataset(list(examples), tokenizer, list(answers), image_size, 256):
        features, pooled, mask = routing_features(model, inputs)
        num_text = inputs["token_ids"].shape[1]
        kinds = {"all": mask, "image": mask.copy(), "text": mask.copy()}
        kinds["image"][:, 0] = False
        kinds["image"][:, -num_text:] = False
        kinds["text"][:, :-num_text] = False
        for block, x in zip(blocks, features):
            for kind, kind_mask in kinds.items():
                counts[kind] += block.ffn.routing_counts(x, kind_mask)
        heads += np.bincount(keras.ops.convert_to_numpy(head.routed_expert(pooled)), minlength=len(expert_names))
    shares = {kind: dict(zip(expert_names, (c / max(c.sum(), 1)).round(4).tolist())) for kind, c in counts.items()}
    shares["head"] = dict(zip(expert_names, (heads / max(heads.sum(), 1)).round(4).tolist()))
    return shares


def routed_slots(model: keras.Model, examples: Sequence, tokenizer, image_size: int) -> np.ndarray:
    """Per example, where a model with adapter experts routes it: 0 the base, `e + 1` expert `e`."""
    layer = model.get_layer("adapter_experts")
    labels = sorted({e.answer for e in examples})  # routing reads no label
    data = make_dataset(list(examples), tokenizer, labels, image_size, 256)
    return np.concatenate([keras.ops.convert_to_numpy(layer.routed_slots(inputs)[0]) for inputs, _ in data])


def routing_report(model: keras.Model, examples: Sequence, tokenizer, answers: Sequence[str], image_size: int,
                   expert_names: Sequence[str]) -> dict[str, float]:
    """Share of the examples each expert answers (adapter experts), or of their real tokens
    each expert processes over every SparseMoE block (FFN experts)."""
    if any(layer.name == "adapter_experts" for layer in model.layers):
        slots = routed_slots(model, examples, tokenizer, image_size)
        shares = np.bincount(slots, minlength=len(expert_names)) / max(len(slots), 1)
        return dict(zip(expert_names, shares.round(4).tolist()))
    return routing_shares(model, examples, tokenizer, answers, image_size, expert_names)["all"]


def domain_datasets(domains: Sequence[str]) -> dict[str, str]:
    """For each domain, the first installed plugin dataset of that domain (domains without one are left out)."""
    from kvlm.experts import datasets

    found = {}
    for domain in domains:
        names = sorted(name for name, info in datasets().items() if info.spec.domain == domain)
        if names:
            found[domain] = names[0]
    return found


def held_out_examples(base: Base, installed: InstalledModel, size: int, seed: int = 0) -> dict[str, list]:
    """`size` held-out examples of the general task and of each installed expert's domain that has a dataset."""
    domains = [installed.domains[name] for name in installed.experts]
    sets = {GENERAL: shapes.generate(size, seed=seed + 10_000, image_size=base.image_size)}
    for domain, dataset in domain_datasets(domains).items():
        sets[domain] = mix_datasets([dataset], 1, size, seed, base.image_size)[1]
    return sets


def installed_report(base: Base, installed: InstalledModel, size: int = 500, seed: int = 0) -> dict[str, Any]:
    """Per domain: accuracy of the base alone and with the experts installed, and the routing shares."""
    names = [GENERAL, *installed.experts]
    report = {}
    for domain, examples in held_out_examples(base, installed, size, seed).items():
        report[domain] = {
            "examples": len(examples),
            "base": answer_accuracy(base.model, examples, base.tokenizer, base.answers, base.image_size),
            "installed": answer_accuracy(installed.model, examples, installed.tokenizer, installed.answers,
                                         base.image_size),
            "routing": routing_report(installed.model, examples, installed.tokenizer, installed.answers,
                                      base.image_size, names),
        }
    return report


def format_installed_report(report: dict[str, Any], experts: Sequence[str]) -> str:
    """The report as two tables: accuracy per domain, and where each domain's tokens are routed."""
    names = [GENERAL, *experts]
    lines = ["domain     examples  base alone  with experts"]
    lines += [f"{d:<10} {r['examples']:>8}  {r['base']:>10.3f}  {r['installed']:>12.3f}" for d, r in report.items()]
    lines += ["", "routing (share per expert of the examples, or of the real tokens for FFN experts)", f"{'domain':<10} " + " ".join(f"{n:>8}" for n in names)]
    lines += [f"{d:<10} " + " ".join(f"{r['routing'][n]:>8.3f}" for n in names) for d, r in report.items()]
    return "\n".join(lines)


def write_installed_run(installed: InstalledModel, out: str | Path, eval_size: int = 500) -> Path:
    """Writes `installed` as a classifier run folder (`kvlm evaluate` and `kvlm export` read it):
    `model.keras`, `vocabulary.txt`, `answers.txt` and a `run.json` whose held-out data are
    `eval_size` examples of the experts' domain datasets."""
    out = Path(out)
    datasets = sorted(domain_datasets(installed.domains.values()).values())
    config = TrainConfig(task="domain_expert", output=str(out), datasets=datasets or None, epochs=0,
                         train_size=max(len(datasets), 1), eval_size=eval_size)
    write_run_files(out, config, installed.vocabulary, installed.answers)
    installed.model.save(out / MODEL_FILE)
    return out
