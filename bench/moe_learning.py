"""Dense vs sparse MoE tiny VLM on the three plugin domain datasets mixed (TensorFlow backend).

Both models are `kvlm_tiny` classifiers (CNN image encoder, 3 fusion blocks) trained
with `kvlm.training.fit` on the same examples, seed, steps and optimizer:

- dense: every fusion block has a dense GELU FFN (64 -> 128 -> 64);
- moe: the middle fusion block's FFN is a `SparseMoE` whose experts are the
  discovered (installed) experts `ffn` (kvlm), `legal`, `medical` and `retail`
  (the first-party plugins), routed top-1. Each expert's width is set so that it
  has the dense FFN's parameter count (within 0.2%), so the parameters active
  per token equal the dense model's, plus the router's.

The held-out mix is evaluated overall and per domain with `kvlm.training.evaluate`
(the saved `.keras` model reloaded), and the MoE model's routing per domain is
written as a table and a heatmap (`kvlm.training.routing`).

Run: `python bench/moe_learning.py` (writes bench/results/moe_learning.json,
moe_learning.md and routing.png).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common

common.use_tensorflow(__file__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from kvlm.experts import build_expert, datasets  # noqa: E402
from kvlm.layers.fusion import FeedForward  # noqa: E402
from kvlm.models import get_preset  # noqa: E402
from kvlm.training import TrainConfig, evaluate, fit, load_examples, load_run  # noqa: E402
from kvlm.training.routing import (  # noqa: E402
    RoutingReport,
    format_routing_report,
    moe_blocks,
    save_routing_heatmap,
)

DATASETS = ["legal_documents", "medical_scans", "retail_shelves"]
# Expert widths giving each expert the dense FFN's parameter count at d_model=64 (16,576).
EXPERT_OPTIONS = {
    "ffn": {"hidden_dim": 128},      # 2 * 64 * 128 + 128 + 64           = 16,576
    "legal": {"hidden_dim": 124},    # 129 * 124 + 64 + 2 * 64 * 4 (rank) = 16,572
    "medical": {"hidden_dim": 86},   # 3 * 64 * 86 + 86 (GLU)             = 16,598
    "retail": {"hidden_dim": 129},   # 2 * 129 * 64 + 64 (key-value)      = 16,576
}


def count(layer_or_weights) -> int:
    weights = layer_or_weights.weights if hasattr(layer_or_weights, "weights") else layer_or_weights
    return int(sum(np.prod(w.shape) for w in weights))


def parameter_counts(model: keras.Model, top_k: int) -> dict:
    """Total and per-token active trainable parameters (experts: the chosen top_k only)."""
    total = count(model.trainable_weights)
    blocks = moe_blocks(model)
    if not blocks:
        return {"total": total, "active_per_token": [total, total]}
    inactive_min = inactive_max = 0
    for _, moe in blocks:
        sizes = sorted(count(layer.trainable_weights) for layer in moe.bank.expert_layers)
        # Active: the router and the top_k experts a token goes to (smallest or largest ones).
        inactive_max += sum(sizes) - sum(sizes[:top_k])
        inactive_min += sum(sizes) - sum(sizes[-top_k:])
    return {
        "total": total,
        "active_per_token": [total - inactive_max, total - inactive_min],
        "experts": {name: count(layer.trainable_weights) for name, layer in zip(moe.expert_names, moe.bank.expert_layers)},
        "router": int(np.prod(moe.router_kernel.shape)),
    }


def chance(train_examples, eval_examples) -> dict:
    answers = sorted({e.answer for e in train_examples})
    values, counts = np.unique([e.answer for e in train_examples], return_counts=True)
    majority = values[counts.argmax()]
    # Question-only baseline: the most frequent training answer of each exact question.
    by_question: dict[str, dict[str, int]] = {}
    for e in train_examples:
        by_question.setdefault(e.question, {}).setdefault(e.answer, 0)
        by_question[e.question][e.answer] += 1
    guess = {q: max(c, key=c.get) for q, c in by_question.items()}
    hits = np.array([guess.get(e.question, majority) == e.answer for e in eval_examples])
    domains = np.array([e.domain for e in eval_examples])
    return {
        "answers": len(answers),
        "uniform": 1.0 / len(answers),
        "majority_answer": str(majority),
        "majority_accuracy": float(np.mean([e.answer == majority for e in eval_examples])),
        "question_only_accuracy": float(hits.mean()),
        "question_only_per_domain": {str(d): float(hits[domains == d].mean()) for d in sorted(set(domains))},
    }


def run_model(name: str, config: TrainConfig) -> dict:
    start = time.perf_counter()
    summary = fit(config, strategy=None, verbose=2, checkpoint=False)
    wall = time.perf_counter() - start
    report = evaluate(config.output)
    model = load_run(config.output).model
    top_k = (config.overrides.get("moe") or {}).get("top_k", 1)
    result = {
        "name": name,
        "accuracy": report["accuracy"],
        "loss": report["loss"],
        "macro_f1": report["macro_f1"],
        "per_domain": {d: row["accuracy"] for d, row in report["per_domain"].items()},
        "per_domain_examples": {d: row["examples"] for d, row in report["per_domain"].items()},
        "params": parameter_counts(model, top_k),
        "train_seconds": summary["train_seconds"],
        "wall_seconds": wall,
        "steps": summary["steps"],
        "val_accuracy_per_epoch": summary["history"].get("val_accuracy"),
    }
    if "routing" in summary:
        result["routing"] = summary["routing"]
    print(f"{name}: held-out accuracy {result['accuracy']:.4f} {result['per_domain']} in {wall:.0f}s", flush=True)
    return result


def markdown(results: dict) -> str:
    dense, moe = results["models"]["dense"], results["models"]["moe"]
    setup, ch = results["setup"], results["chance"]
    domains = sorted(dense["per_domain"])

    def active(model):
        low, high = model["params"]["active_per_token"]
        return f"{low:,}" if low == high else f"{low:,}–{high:,}"

    lines = [
        "# Dense vs sparse MoE on the three domain datasets (TensorFlow, CPU)",
        "",
        f"Data: {', '.join(setup['datasets'])} mixed in equal shares: {setup['train_examples']:,} training "
        f"and {setup['eval_examples']:,} held-out examples ({setup['eval_examples'] // 3:,} per domain), "
        f"{ch['answers']} answers. Chance: {ch['uniform']:.3f} uniformly; always answering the most frequent "
        f"training answer ({ch['majority_answer']!r}) scores {ch['majority_accuracy']:.3f} on the held-out mix. "
        f"A question-only model (the most frequent training answer of each question, no image) scores "
        f"{ch['question_only_accuracy']:.3f} ("
        + ", ".join(f"{d} {a:.3f}" for d, a in ch["question_only_per_domain"].items())
        + "): accuracy above that needs the image.",
        "",
        f"Both models: `kvlm_tiny`, CNN encoder, seed {setup['seed']}, {setup['epochs']} epochs x "
        f"{dense['steps'] // setup['epochs']} steps of batch {setup['batch_size']}, AdamW (peak learning rate "
        f"{setup['learning_rate']}, warm-up + cosine decay), `kvlm.training.fit`. MoE: `{setup['moe']}`.",
        "",
        "| model | held-out accuracy | " + " | ".join(domains) + " | parameters (total) | active per token "
        "| training time |",
        "|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|",
    ]
    for model in (dense, moe):
        lines.append(
            f"| {model['name']} | **{model['accuracy']:.4f}** | "
            + " | ".join(f"{model['per_domain'][d]:.4f}" for d in domains)
            + f" | {model['params']['total']:,} | {active(model)} | {model['train_seconds']:.0f} s |"
        )
    lines += [
        "",
        f"MoE minus dense held-out accuracy: {moe['accuracy'] - dense['accuracy']:+.4f} "
        f"({'MoE >= dense' if moe['accuracy'] >= dense['accuracy'] else 'MoE < dense'}).",
        "",
        "Experts (trainable parameters each): "
        + ", ".join(f"{k} {v:,}" for k, v in moe["params"]["experts"].items())
        + f"; dense FFN {setup['dense_ffn_params']:,}; router {moe['params']['router']:,}. Active per token ="
        " total minus the experts a token does not use (a range because expert sizes differ by up to 26).",
        "",
        "Held-out accuracy after each epoch: dense "
        + ", ".join(f"{a:.3f}" for a in dense["val_accuracy_per_epoch"])
        + "; moe "
        + ", ".join(f"{a:.3f}" for a in moe["val_accuracy_per_epoch"])
        + ".",
        "",
        "## Routing (MoE model, held-out examples)",
        "",
        "Fraction of each domain's real (non-padding) tokens routed to each expert, inference capacity; "
        "heatmap in `routing.png`.",
        "",
        "```",
        format_routing_report(RoutingReport.from_dict(moe["routing"])),
        "```",
        "",
        f"Total wall time {results['wall_seconds']:.0f} s (data, both trainings, evaluation, routing); "
        f"{results['environment']['cpu_count']} CPUs, load average after the run "
        f"{', '.join(f'{x:.1f}' for x in results['environment']['load_average_after'])}.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = common.training_parser(__doc__, train_size=12000, eval_size=1500, epochs=6, batch_size=32,
                                    learning_rate=2e-3, seed=0, output=str(common.RESULTS / "moe_learning.json"))
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--load-balance-weight", type=float, default=1e-2)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    moe = {
        "experts": sorted(EXPERT_OPTIONS),
        "top_k": args.top_k,
        "capacity_factor": args.capacity_factor,
        "load_balance_weight": args.load_balance_weight,
        "expert_options": EXPERT_OPTIONS,
    }
    missing = set(DATASETS) - set(datasets())
    if missing:
        sys.exit(f"Install the first-party plugins (plugins/kvlm-*): missing datasets {sorted(missing)}.")
    preset = get_preset("kvlm_tiny")
    dense_ffn = FeedForward(preset["hidden_dim"], preset["intermediate_dim"])
    dense_ffn.build((None, preset["hidden_dim"]))
    for name, options in EXPERT_OPTIONS.items():
        expert = build_expert(name, d_model=preset["hidden_dim"], **options)
        expert.build((None, preset["hidden_dim"]))
        assert abs(count(expert) - count(dense_ffn)) <= 0.002 * count(dense_ffn), (name, count(expert))

    work = Path(tempfile.mkdtemp(prefix="moe_learning_"))
    base = dict(
        preset="kvlm_tiny", encoder="cnn", datasets=DATASETS, train_size=args.train_size,
        eval_size=args.eval_size, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed,
    )
    configs = {
        "dense": TrainConfig(output=str(work / "dense"), **base),
        "moe": TrainConfig(output=str(work / "moe"), overrides={"moe": moe}, **base),
    }
    train_examples, eval_examples = load_examples(configs["dense"])
    models = {name: run_model(name, config) for name, config in configs.items()}

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = RoutingReport.from_dict(models["moe"]["routing"])
    print(format_routing_report(report))
    save_routing_heatmap(report, output.parent / "routing.png")
    results = {
        "setup": base | {"moe": moe, "train_examples": len(train_examples), "eval_examples": len(eval_examples),
                         "dense_ffn_params": count(dense_ffn)},
        "chance": chance(train_examples, eval_examples),
        "models": models,
        "moe_minus_dense": models["moe"]["accuracy"] - models["dense"]["accuracy"],
        "wall_seconds": time.perf_counter() - start,
        "command": ("python bench/moe_learning.py " + shlex.join(argv if argv is not None else sys.argv[1:])).strip(),
        "environment": {
            "keras": keras.__version__, "tensorflow": tf.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(),
        },
    }
    common.write_results(output.parent, output.stem, results, markdown(results))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {output}, {output.with_suffix('.md')} and {output.parent / 'routing.png'} "
          f"in {results['wall_seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
