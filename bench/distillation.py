"""Distilling a sparse MoE teacher into a small dense student on the shapes VQA task (TensorFlow).

Three models, trained on the same procedural shapes examples with AdamW (linear
warm-up, cosine decay) and batch `--batch-size`:

- teacher: `kvlm_tiny` (CNN encoder) whose middle fusion block is a `SparseMoE`
  (`--experts` built-in experts, top-2), trained for `--teacher-steps` steps;
- distilled student: a dense `kvlm_tiny` at half width (hidden 32, 2 heads,
  FFN 64, 16 CNN filters, 2 fusion blocks), trained with `kvlm.models.Distiller`
  (`alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher || student)`) for
  `--student-steps` steps;
- scratch student: the same architecture and initial weights, trained on the
  labels alone for the same number of steps, batches and learning-rate schedule.

All three are scored on the same held-out examples (accuracy overall and per
question type). Parameters and per-example forward FLOPs come from
`kvlm.models.flops` (the MoE teacher's active FLOPs: router + top-2 experts).

Run: `python bench/distillation.py` (writes bench/results/distillation.json and
distillation.md).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time

import common

common.use_tensorflow(__file__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from kvlm.data import answer_vocabulary, build_vocabulary, encode_answers, make_dataset, make_tokenizer  # noqa: E402
from kvlm.models import VLMClassifier, get_preset  # noqa: E402
from kvlm.models.distiller import Distiller  # noqa: E402
from kvlm.models.flops import model_profile  # noqa: E402
from kvlm.training import TrainConfig, load_examples  # noqa: E402
from kvlm.training.loop import training_stream  # noqa: E402

STUDENT = dict(hidden_dim=32, num_heads=2, intermediate_dim=64, cnn_filters=16, num_fusion_layers=2)
QUESTION_TYPES = {
    "what color": "color", "what shape": "shape", "where": "position", "what size": "size",
    "how many": "count", "is there": "exists",
}


def question_type(question: str) -> str:
    return next(kind for prefix, kind in QUESTION_TYPES.items() if question.startswith(prefix))


def optimizer(args, steps: int) -> keras.optimizers.Optimizer:
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(steps, 1), warmup_target=args.learning_rate, warmup_steps=max(steps // 20, 1)
    )
    return keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay)


def accuracy_metric():
    return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def score(model, eval_data, labels, kinds) -> dict:
    logits = np.asarray(model.predict(eval_data, verbose=0))
    hits = logits.argmax(axis=-1) == labels
    return {
        "accuracy": float(hits.mean()),
        "per_question_type": {k: float(hits[kinds == k].mean()) for k in sorted(set(kinds))},
    }


def train(name, model, stream, steps, evals, eval_data) -> dict:
    """Fits `steps` steps in `evals` epochs (held-out accuracy after each); returns timings and curves."""
    per_epoch = steps // evals
    start = time.perf_counter()
    history = model.fit(
        stream, steps_per_epoch=per_epoch, epochs=evals, validation_data=eval_data, verbose=2, shuffle=False
    )
    seconds = time.perf_counter() - start
    print(f"{name}: {per_epoch * evals} steps in {seconds:.0f}s", flush=True)
    return {
        "steps": per_epoch * evals,
        "train_seconds": seconds,
        "loss_per_epoch": [float(v) for v in history.history["loss"]],
        "val_accuracy_per_epoch": [float(v) for v in history.history["val_accuracy"]],
    }


def markdown(results: dict) -> str:
    s, m = results["setup"], results["models"]
    t, d, c = m["teacher"], m["distilled_student"], m["scratch_student"]
    r = results["ratios"]
    kinds = sorted(t["per_question_type"])

    def row(name, model):
        p = model["profile"]
        per_type = " | ".join(f"{model['per_question_type'][k]:.3f}" for k in kinds)
        return (
            f"| {name} | **{model['accuracy']:.4f}** | {per_type} | {p['parameters']['total']:,} | "
            f"{p['parameters']['active']:,} | {p['flops'] / 1e6:.2f} M | {model['steps']} | {model['train_seconds']:.0f} s |"
        )

    lines = [
        "# Distilling a sparse MoE teacher into a small dense student (shapes VQA, TensorFlow, CPU)",
        "",
        f"Data: procedural shapes VQA, {s['train_examples']:,} training and {s['eval_examples']:,} held-out examples "
        f"(different seeds), {s['num_classes']} answers; chance 1/{s['num_classes']} uniformly, about 0.375 for the "
        "best question-only model.",
        "",
        f"Teacher: `kvlm_tiny`, CNN encoder, middle fusion block a `SparseMoE` {s['moe']}. Student: `kvlm_tiny` "
        f"with {s['student_overrides']} (dense). Distillation: `kvlm.models.Distiller`, alpha {s['alpha']}, "
        f"temperature {s['temperature']}. All: batch {s['batch_size']}, AdamW (peak learning rate "
        f"{s['learning_rate']}, weight decay {s['weight_decay']}, 5% linear warm-up then cosine decay over each "
        f"run's steps), seed {s['seed']}; both students start from the same initial weights and see the same "
        "batches in the same order.",
        "",
        "| model | held-out accuracy | " + " | ".join(kinds) + " | parameters | active parameters | "
        "forward FLOPs / example | steps | training time |",
        "|---|---:|" + "---:|" * len(kinds) + "---:|---:|---:|---:|---:|",
        row("teacher (MoE)", t),
        row("distilled student", d),
        row("scratch student", c),
        "",
        f"- Distilled student / teacher accuracy: **{r['distilled_over_teacher_accuracy']:.3f}**; scratch student / "
        f"teacher: {r['scratch_over_teacher_accuracy']:.3f}; distilled minus scratch: "
        f"{d['accuracy'] - c['accuracy']:+.4f}.",
        f"- Student / teacher parameters: {r['parameters']:.3f} of the total, {r['active_parameters']:.3f} of the "
        f"teacher's active (top-2) parameters; forward FLOPs: {r['flops']:.3f} (teacher's active FLOPs).",
        f"- Held-out accuracy after each evaluation: teacher {fmt(t['val_accuracy_per_epoch'])}; distilled "
        f"{fmt(d['val_accuracy_per_epoch'])}; scratch {fmt(c['val_accuracy_per_epoch'])}.",
        "",
        "FLOPs: analytic count of dense / einsum projections, convolutions and the attention products (2 per "
        "multiply-add, 1 per bias), per example, over the full padded sequence; the MoE layer counts its router and "
        "its top-2 experts per token. Element-wise work is not counted.",
        "",
        results["note"],
        "",
        f"Total wall time {results['wall_seconds']:.0f} s (data generation, three trainings, evaluations) on "
        f"{results['machine']['cpus']} CPUs shared with other work; load average after the run "
        f"{', '.join(f'{x:.1f}' for x in results['machine']['load_average'])}.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def fmt(values) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def main(argv=None) -> dict:
    parser = common.training_parser(__doc__, train_size=8000, eval_size=1000, batch_size=64, learning_rate=2e-3,
                                    seed=0, output=str(common.RESULTS))
    parser.add_argument("--teacher-steps", type=int, default=360)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--evals", type=int, default=2, help="held-out evaluations per training run")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args(argv)
    wall = time.perf_counter()

    config = TrainConfig(train_size=args.train_size, eval_size=args.eval_size, batch_size=args.batch_size,
                         seed=args.seed, encoder="cnn")
    train_examples, eval_examples = load_examples(config)
    vocabulary = build_vocabulary(
        [e.question for e in train_examples] + [e.caption for e in train_examples], config.vocabulary_size
    )
    answers = answer_vocabulary(train_examples)
    image_size, sequence_length = (get_preset("kvlm_tiny")[k] for k in ("image_size", "sequence_length"))
    tokenizer = make_tokenizer(vocabulary, sequence_length)
    eval_data = make_dataset(eval_examples, tokenizer, answers, image_size, 256)
    labels = encode_answers(eval_examples, answers)
    kinds = np.array([question_type(e.question) for e in eval_examples])

    def stream():
        return training_stream(
            lambda seed: make_dataset(
                train_examples, tokenizer, answers, image_size, args.batch_size, shuffle=True, seed=seed
            ),
            args.seed,
        )

    def build(**overrides):
        return VLMClassifier.from_preset(
            "kvlm_tiny", num_classes=len(answers), vocabulary_size=len(vocabulary), encoder="cnn", **overrides
        )

    models = {}
    moe = {"experts": args.experts, "top_k": 2}
    keras.utils.set_random_seed(args.seed)
    teacher = build(moe=moe)
    teacher.compile(
        optimizer=optimizer(args, args.teacher_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[accuracy_metric()],
    )
    models["teacher"] = train("teacher", teacher, stream(), args.teacher_steps, args.evals, eval_data)
    models["teacher"] |= score(teacher, eval_data, labels, kinds) | {"profile": model_profile(teacher)}

    keras.utils.set_random_seed(args.seed + 1)
    student = build(**STUDENT)
    initial = student.get_weights()
    distiller = Distiller(teacher, student)
    distiller.compile(
        optimizer=optimizer(args, args.student_steps), metrics=[accuracy_metric()],
        alpha=args.alpha, temperature=args.temperature,
    )
    models["distilled_student"] = train("distilled", distiller, stream(), args.student_steps, args.evals, eval_data)
    models["distilled_student"] |= score(student, eval_data, labels, kinds) | {"profile": model_profile(student)}

    keras.utils.set_random_seed(args.seed + 1)
    scratch = build(**STUDENT)
    scratch.set_weights(initial)
    scratch.compile(
        optimizer=optimizer(args, args.student_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[accuracy_metric()],
    )
    models["scratch_student"] = train("scratch", scratch, stream(), args.student_steps, args.evals, eval_data)
    models["scratch_student"] |= score(scratch, eval_data, labels, kinds) | {"profile": model_profile(scratch)}

    t, d, c = models["teacher"], models["distilled_student"], models["scratch_student"]
    ratios = {
        "distilled_over_teacher_accuracy": d["accuracy"] / t["accuracy"],
        "scratch_over_teacher_accuracy": c["accuracy"] / t["accuracy"],
        "parameters": d["profile"]["parameters"]["total"] / t["profile"]["parameters"]["total"],
        "active_parameters": d["profile"]["parameters"]["total"] / t["profile"]["parameters"]["active"],
        "flops": d["profile"]["flops"] / t["profile"]["flops"],
    }
    plateau = max(t["accuracy"], d["accuracy"], c["accuracy"]) < 0.8
    note = (
        "Reading: these budgets end inside the plateau of the shapes task (held-out accuracy near 0.6-0.7 for "
        "the first ~2,000 steps at batch 64, README \"Learning result\"): the teacher is far from the 0.95-0.99 "
        "that `kvlm_tiny` reaches after ~3,000 steps, and the students are compared in early training."
        if plateau else
        "Reading: the teacher got past the shapes task's early plateau (near 0.6-0.7) within this budget."
    )
    results = {
        "setup": {
            "train_examples": len(train_examples), "eval_examples": len(eval_examples), "num_classes": len(answers),
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
            "teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "moe": moe,
            "student_overrides": STUDENT, "alpha": args.alpha, "temperature": args.temperature, "seed": args.seed,
            "backend": keras.backend.backend(), "keras": keras.__version__,
        },
        "models": models,
        "ratios": ratios,
        "note": note,
        "wall_seconds": time.perf_counter() - wall,
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()), "platform": platform.platform()},
        "command": "python bench/distillation.py" + ("" if argv is None and len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv)),
    }
    common.write_results(args.output, "distillation", results, markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
