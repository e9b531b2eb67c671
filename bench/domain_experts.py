"""Domain experts trained against the released base, installed with no host training.

    python bench/domain_experts.py [--train-size 6000] [--eval-size 1000] [--epochs 6]

For every domain dataset of the installed plugins (medical, legal, retail), an expert is
trained with the base `kvlm_tiny_vqa` frozen (`kvlm train --task domain_expert`), then all
of them are installed into the base at once (`install_experts`: router keys, no gradient
step) and measured on held-out splits. Beside them: the same experts with random keys; the
base fine-tuned on all domains jointly (one shared branch, the three experts' steps); and a
Branch-Train-MiX merge whose learned top-2 routers train on the mixed domains and general
data for one expert's steps. Writes bench/results/domain_experts.json and .md.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import common
import numpy as np

DOMAINS = ("legal", "medical", "retail")
NEW_DOMAIN = "retail"  # reported as `new_domain`; none of the domains' words and answers are in the base


def _train(name: str, domain: str, names: list[str], args, root: Path, scale: int = 1) -> Path:
    """A `kvlm train --task domain_expert` run on the datasets `names`; returns its folder."""
    from kvlm.runs import TrainConfig
    from kvlm.training import fit

    config = TrainConfig(
        task="domain_expert", output=str(root / name), datasets=names, train_size=args.train_size * scale,
        eval_size=args.eval_size * scale, epochs=args.epochs, seed=args.seed,
        task_options={"expert_name": name, "domain": domain},
    )
    fit(config, verbose=0, checkpoint=False)
    return root / name


def _held_out(run_dir: Path) -> list:
    from kvlm.runs import read_config
    from kvlm.training.examples import load_examples
    from kvlm.training.loop import resolve_config

    return load_examples(resolve_config(read_config(run_dir)))[1]


def _btx(base, experts, train, steps: int, batch_size: int, learning_rate: float):
    """Branch-Train-MiX: the experts merged under learned top-2 routers, trained on `train` for
    `steps` steps (only the routers train); returns the merged `InstalledModel`."""
    import keras

    from kvlm.data import make_dataset
    from kvlm.domain_experts import install_experts

    from kvlm.layers import FusionBlock

    merged = install_experts(base, experts, router="learned")
    model = merged.model
    for layer in model.layers:  # in the fusion blocks only the routers are trainable
        layer.trainable = isinstance(layer, FusionBlock)
    assert all("router_kernel" in w.path for w in model.trainable_weights)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    model.compile(keras.optimizers.AdamW(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = make_dataset(train, merged.tokenizer, merged.answers, base.image_size, batch_size, shuffle=True, seed=0)
    model.fit(data.repeat(), steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
    return merged


def main() -> None:
    parser = common.training_parser(__doc__, train_size=6000, eval_size=1000, epochs=6, seed=0)
    args = parser.parse_args()

    import tempfile

    import keras

    from kvlm.data import shapes
    from kvlm.domain_experts import Base, DomainExpert, install_experts
    from kvlm.runs import load_run
    from kvlm.tasks.domain_expert.task import EXPERT_DIR
    from kvlm.domain_experts.report import domain_datasets, routing_shares
    from kvlm.training.evaluation import answer_accuracy

    keras.utils.set_random_seed(args.seed)
    base = Base.load("kvlm_tiny_vqa")
    size = base.image_size
    general = shapes.generate(args.eval_size, seed=1000 + args.seed)
    workspace = tempfile.TemporaryDirectory(prefix="kvlm-domain-experts-")
    root = Path(workspace.name)
    datasets = domain_datasets(DOMAINS)
    missing = sorted(set(DOMAINS) - set(datasets))
    if missing:
        raise SystemExit(f"no installed dataset of the {', '.join(missing)} domain (pip install kvlm-<domain>)")

    started = time.perf_counter()
    runs = {d: _train(d, d, [datasets[d]], args, root) for d in DOMAINS}
    training_seconds = time.perf_counter() - started
    experts = [DomainExpert.load(runs[d] / EXPERT_DIR) for d in DOMAINS]
    held_out = {d: _held_out(runs[d]) for d in DOMAINS}

    started = time.perf_counter()
    installed = install_experts(base, experts)
    install_seconds = time.perf_counter() - started
    tokenizer, answers = installed.tokenizer, installed.answers
    optimizer = getattr(installed.model, "optimizer", None)
    host_steps = 0 if optimizer is None else int(optimizer.iterations)
    names = ["general", *DOMAINS]

    def merged_accuracy(examples):
        return answer_accuracy(installed.model, examples, tokenizer, answers, size)

    base_general = answer_accuracy(base.model, general, base.tokenizer, base.answers, size)
    merged_general = merged_accuracy(general)
    per_domain = {}
    for d, expert in zip(DOMAINS, experts):
        per_domain[d] = {
            "base": answer_accuracy(base.model, held_out[d], base.tokenizer, base.answers, size),
            "specialist": expert.metrics["accuracy"],
            "installed": merged_accuracy(held_out[d]),
            "routing": routing_shares(installed.model, held_out[d], tokenizer, answers, size, names),
        }
    general_routing = routing_shares(installed.model, general, tokenizer, answers, size, names)

    # Control: the same experts with random keys (random unit means, the experts' own precisions).
    rng = np.random.default_rng(args.seed)
    random_experts = []
    for expert in experts:
        keys = expert.keys.copy()
        means = rng.normal(size=keys[:, 0, :].shape)
        keys[:, 0, :] = means / np.linalg.norm(means, axis=-1, keepdims=True)
        random_experts.append(replace(expert, keys=keys))
    randomized = install_experts(base, random_experts)
    random_control = {
        d: {"installed": answer_accuracy(randomized.model, held_out[d], randomized.tokenizer, randomized.answers, size),
            "routing_to_own_expert": routing_shares(randomized.model, held_out[d], randomized.tokenizer,
                                              randomized.answers, size, names)["all"][d]}
        for d in DOMAINS
    }
    random_control["general_accuracy"] = answer_accuracy(randomized.model, general, randomized.tokenizer,
                                                         randomized.answers, size)

    # Control: cosine keys (each Gaussian key's mean alone, as in mean-feature routing).
    cosine_base = replace(base, keys=base.keys[:, 0, :])
    cosine = install_experts(cosine_base, [replace(e, keys=e.keys[:, 0, :]) for e in experts])
    cosine_control = {
        d: {"installed": answer_accuracy(cosine.model, held_out[d], cosine.tokenizer, cosine.answers, size),
            "routing_to_own_expert": routing_shares(cosine.model, held_out[d], cosine.tokenizer, cosine.answers,
                                                    size, names)["all"][d]}
        for d in DOMAINS
    }
    cosine_control["general_accuracy"] = answer_accuracy(cosine.model, general, cosine.tokenizer, cosine.answers,
                                                         size)
    cosine_control["general_routing_to_general"] = routing_shares(cosine.model, general, cosine.tokenizer,
                                                                  cosine.answers, size, names)["all"]["general"]

    # Comparison: one dense branch fine-tuned on all domains jointly, with the three experts' steps.
    joint = load_run(_train("joint", "all", [datasets[d] for d in DOMAINS], args, root, scale=len(DOMAINS)))
    joint_results = {
        d: answer_accuracy(joint.model, held_out[d], joint.tokenizer, joint.answers, size) for d in DOMAINS
    } | {"general": answer_accuracy(joint.model, general, joint.tokenizer, joint.answers, size)}

    # Comparison: BTX, the experts merged under learned routers trained on the mixed data.
    from kvlm.training.examples import mix_datasets

    mixed = mix_datasets([datasets[d] for d in DOMAINS], args.train_size * len(DOMAINS), len(DOMAINS), args.seed, size)[0] + shapes.generate(args.train_size, seed=args.seed, image_size=size)
    btx_steps = args.epochs * (args.train_size // 64)
    started = time.perf_counter()
    btx = _btx(base, experts, mixed, btx_steps, 64, 3e-3)
    btx_seconds = time.perf_counter() - started
    btx_results = {
        d: answer_accuracy(btx.model, held_out[d], btx.tokenizer, btx.answers, size) for d in DOMAINS
    } | {"general": answer_accuracy(btx.model, general, btx.tokenizer, btx.answers, size),
         "host_training_steps": btx_steps, "training_seconds": round(btx_seconds, 1)}

    results = {
        "routing_to_own_expert": {d: per_domain[d]["routing"]["all"][d] for d in DOMAINS},
        "accuracy_over_specialist": {
            d: round(per_domain[d]["installed"] / max(per_domain[d]["specialist"], 1e-9), 4) for d in DOMAINS
        },
        "general_accuracy_drop": round(base_general - merged_general, 4),
        "host_training_steps": host_steps,
        "new_domain": {
            "domain": NEW_DOMAIN,
            "before": per_domain[NEW_DOMAIN]["base"],
            "after": per_domain[NEW_DOMAIN]["installed"],
            "specialist": per_domain[NEW_DOMAIN]["specialist"],
        },
        "general_accuracy": {"base": base_general, "installed": merged_general},
        "domains": per_domain,
        "general_routing": general_routing,
        "random_key_control": random_control,
        "cosine_key_control": cosine_control,
        "joint_fine_tune": joint_results,
        "btx_learned_router": btx_results,
        "experts": {e.name: {"new_words": len(e.words), "new_answers": len(e.answers)} for e in experts},
        "config": {"base": "kvlm_tiny_vqa", "base_fingerprint": base.fingerprint, "train_size": args.train_size,
                   "eval_size": args.eval_size, "epochs": args.epochs, "seed": args.seed,
                   "expert_training_seconds": round(training_seconds, 1),
                   "install_seconds": round(install_seconds, 2), "keras_backend": keras.backend.backend()},
    }
    workspace.cleanup()
    markdown = _markdown(results, names)
    common.write_results(common.RESULTS, "domain_experts", results, markdown)
    print(markdown)


def _markdown(r: dict, names: list[str]) -> str:
    lines = [
        "# Domain experts installed into the released base (`python bench/domain_experts.py`)",
        "",
        f"Base `kvlm_tiny_vqa` ({r['config']['base_fingerprint']}); each expert trained on "
        f"{r['config']['train_size']} examples x {r['config']['epochs']} epochs with the base frozen; "
        f"held-out {r['config']['eval_size']} per domain. Host training steps after installing: "
        f"{r['host_training_steps']}.",
        "",
        "| domain | base alone | specialist | installed (all experts) | installed / specialist | routed to own expert | joint fine-tune | BTX learned router | random keys | cosine keys (routed to own) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, v in r["domains"].items():
        lines.append(
            f"| {d} | {v['base']:.3f} | {v['specialist']:.3f} | {v['installed']:.3f} | "
            f"{r['accuracy_over_specialist'][d]:.3f} | {r['routing_to_own_expert'][d]:.3f} | "
            f"{r['joint_fine_tune'][d]:.3f} | {r['btx_learned_router'][d]:.3f} | "
            f"{r['random_key_control'][d]['installed']:.3f} | {r['cosine_key_control'][d]['installed']:.3f} "
            f"({r['cosine_key_control'][d]['routing_to_own_expert']:.3f}) |"
        )
    g = r["general_accuracy"]
    lines += [
        f"| general (shapes) | {g['base']:.3f} | - | {g['installed']:.3f} | drop {r['general_accuracy_drop']:.4f} | "
        f"{r['general_routing']['all']['general']:.3f} | {r['joint_fine_tune']['general']:.3f} | "
        f"{r['btx_learned_router']['general']:.3f} | "
        f"{r['random_key_control']['general_accuracy']:.3f} | {r['cosine_key_control']['general_accuracy']:.3f} "
        f"({r['cosine_key_control']['general_routing_to_general']:.3f}) |",
        "",
        f"Joint fine-tune: one branch of the base trained on the three domains mixed ({3 * r['config']['train_size']} "
        f"examples x {r['config']['epochs']} epochs). BTX: the same experts merged under learned top-2 routers, "
        f"trained for {r['btx_learned_router']['host_training_steps']} host steps on the domains and general data "
        f"({r['btx_learned_router']['training_seconds']} s).",
        "",
        "Routing heatmap: share of each data's real tokens per expert over all MoE blocks, as the model routes "
        "(all: each sequence on all its tokens); with each sequence routed on its image tokens alone (image) or "
        "its text tokens alone (text); and the share of sequences whose answers the head takes from each expert (head).",
        "",
        "| data | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = [("general", r["general_routing"])] + [(d, v["routing"]) for d, v in r["domains"].items()]
    for label, routing in rows:
        for kind in ("all", "image", "text", "head"):
            lines.append(f"| {label} ({kind}) | " + " | ".join(f"{routing[kind][n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
