"""Domain experts trained against the released base, installed with no host training.

    python bench/domain_experts.py [--train-size 6000] [--eval-size 1000] [--epochs 6]

For every domain dataset of the installed plugins (medical, legal, retail), an expert is
trained with the base `kvlm_tiny_vqa` frozen (`kvlm train --task domain_expert`), then all
of them are installed into the base at once (`install_experts`: router keys, no gradient
step) and measured on held-out splits. Beside them: what routing had to beat (a Gaussian
per domain on 4x4-pooled raw pixels, no model at all); two experts trained on the same medical
images with different question sets, installed together; the same experts with random keys
(every key drawn around the keys' common mean, so routing is near chance); the base
fine-tuned on all domains jointly (one shared branch, the three experts' steps); and a merge of
the experts under learned top-2 routers in the manner of Branch-Train-MiX, where only the
routers train (the paper fine-tunes every weight of the merged model), on the mixed domains
and general data for one expert's steps. One seed. Writes bench/results/domain_experts.json and .md.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import common
import numpy as np

DOMAINS = ("legal", "medical", "retail")
NEW_DOMAIN = "retail"  # reported as `new_domain`: the domain with the fewest answers the base already has
# Two question sets about the same medical images (`same_images`), by question prefix.
QUESTION_SETS = {"findings": ("how many", "which organ", "what size"), "lesions": ("what kind", "which side", "is there")}


def _pooled_pixels(examples) -> np.ndarray:
    """Each image averaged over 4x4 windows, flattened, in [0, 1]."""
    images = np.stack([np.asarray(e.image, np.float32) / 255.0 for e in examples])
    n, h, w, c = images.shape
    return images.reshape(n, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4)).reshape(n, -1)


def pixel_control(train: dict[str, list], held_out: dict[str, list]) -> dict:
    """A Gaussian per domain (shrunk covariance) on raw pooled pixels, no model: held-out accuracy at
    telling the domains apart, overall and per domain."""
    fitted = {}
    for domain, examples in train.items():
        x = _pooled_pixels(examples)
        covariance = np.cov(x, rowvar=False) + 1e-3 * np.eye(x.shape[1])
        sign, logdet = np.linalg.slogdet(covariance)
        fitted[domain] = (x.mean(0), np.linalg.inv(covariance), logdet)
    domains = list(train)
    per_domain = {}
    for domain, examples in held_out.items():
        x = _pooled_pixels(examples)
        scores = []
        for mean, precision, logdet in fitted.values():
            d = x - mean
            scores.append(-0.5 * (np.einsum("ni,ij,nj->n", d, precision, d) + logdet))
        per_domain[domain] = float(np.mean(np.argmax(np.stack(scores, 1), 1) == domains.index(domain)))
    return {"accuracy": round(float(np.mean(list(per_domain.values()))), 4),
            "domains": {d: round(v, 4) for d, v in per_domain.items()}}


def same_image_folders(root: Path, size: int, seed: int) -> dict[str, Path]:
    """Folders of medical scans, one per question set of `QUESTION_SETS`, asking each set's
    questions about the same images (one question per set and image)."""
    from kvlm.data import Example
    from kvlm.data.writer import write_folder
    from kvlm_medical import dataset as medical

    rng = np.random.default_rng(seed)
    sets = {name: [] for name in QUESTION_SETS}
    for _ in range(size):
        scene = medical.scene(rng)
        image = medical.render(scene, 32, rng)
        for name, prefixes in QUESTION_SETS.items():
            question, answer = medical.question_for(scene, rng)
            while not question.startswith(prefixes):
                question, answer = medical.question_for(scene, rng)
            sets[name].append(Example(question, answer, medical.caption_for(scene), image=image, domain="medical"))
    folders = {}
    for name, examples in sets.items():
        write_folder(examples, root / f"same_images_{name}")
        folders[name] = root / f"same_images_{name}"
    return folders


def _train(name: str, domain: str, names: list[str] | None, args, root: Path, scale: int = 1,
           data_dir: Path | None = None) -> Path:
    """A `kvlm train --task domain_expert` run on the datasets `names` (or the folder `data_dir`);
    returns its folder."""
    from kvlm.runs import TrainConfig
    from kvlm.training import fit

    config = TrainConfig(
        task="domain_expert", output=str(root / name), datasets=names, data_dir=str(data_dir) if data_dir else None,
        train_size=args.train_size * scale,
        eval_size=args.eval_size * scale, epochs=args.epochs, seed=args.seed,
        task_options={"expert_name": name, "domain": domain, "kind": "ffn"},
    )
    fit(config, verbose=0, checkpoint=False)
    return root / name


def _examples(run_dir: Path) -> tuple[list, list]:
    """The `(train, held_out)` examples of a training run."""
    from kvlm.runs import read_config
    from kvlm.training.examples import load_examples
    from kvlm.training.loop import resolve_config

    return load_examples(resolve_config(read_config(run_dir)))


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
    splits = {d: _examples(runs[d]) for d in DOMAINS}
    held_out = {d: splits[d][1] for d in DOMAINS}

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

    # Control: the same experts with random keys. Every key (the general one too) is the keys' common
    # Gaussian (mean of the means, mean of the precisions) with its mean moved by a random draw of
    # the keys' own spread: routing that knows nothing of the domains, near chance.
    rng = np.random.default_rng(args.seed)
    all_keys = np.stack([base.keys] + [e.keys for e in experts])  # (experts + 1, blocks + 1, d + 1, d)
    mean_key = all_keys.mean(axis=0)
    spread = all_keys[:, :, 0, :].std(axis=0)

    def random_key():
        keys = mean_key.copy()
        keys[:, 0, :] += rng.normal(size=spread.shape) * spread
        return keys

    randomized = install_experts(replace(base, keys=random_key()), [replace(e, keys=random_key()) for e in experts])
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

    # What routing had to beat: the domains told apart from raw pixels alone.
    train_sets = {"general": shapes.generate(args.train_size, seed=args.seed, image_size=size)}
    train_sets |= {d: splits[d][0] for d in DOMAINS}
    pixels = pixel_control(train_sets, {"general": general} | held_out)

    # Two experts on the same images, told apart only by what is asked.
    from kvlm.runs import TrainConfig

    folders = same_image_folders(root, round(args.train_size / (1 - TrainConfig.eval_fraction)), args.seed)
    same_runs = {name: _train(f"medical_{name}", "medical", None, args, root, data_dir=folder)
                 for name, folder in folders.items()}
    same_experts = [DomainExpert.load(same_runs[name] / EXPERT_DIR) for name in folders]
    same_held_out = {name: _examples(same_runs[name])[1] for name in folders}
    both = install_experts(base, same_experts)
    same_names = ["general", *[e.name for e in same_experts]]
    same_images = {"experts": {}}
    for name, expert in zip(folders, same_experts):
        examples = same_held_out[name]
        accuracy = answer_accuracy(both.model, examples, both.tokenizer, both.answers, size)
        same_images["experts"][expert.name] = {
            "specialist": expert.metrics["accuracy"], "installed": accuracy,
            "routing": routing_shares(both.model, examples, both.tokenizer, both.answers, size, same_names)["all"],
        }
    rows = same_images["experts"].values()
    same_images["routing"] = round(float(np.mean([r["routing"][n] for n, r in same_images["experts"].items()])), 4)
    same_images["accuracy_over_specialist"] = round(
        float(np.mean([r["installed"] / max(r["specialist"], 1e-9) for r in rows])), 4)

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
        "pixel_control": pixels,
        "same_images": same_images,
        "new_domain": {
            "domain": NEW_DOMAIN,
            "new_words": len(experts[DOMAINS.index(NEW_DOMAIN)].words),
            "new_answers": len(experts[DOMAINS.index(NEW_DOMAIN)].answers),
            "answers_in_base": len({e.answer for e in held_out[NEW_DOMAIN]} & set(base.answers)),
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
        "experts": {e.name: {"new_words": len(e.words), "new_answers": len(e.answers),
                             "answers_in_base": len({x.answer for x in held_out[e.name]} & set(base.answers)),
                             "answers": len({x.answer for x in held_out[e.name]})} for e in experts},
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
        "| domain | base alone | specialist | installed (all experts) | installed / specialist | routed to own expert | joint fine-tune | learned routers (BTX-style) | random keys (routed to own) | cosine keys (routed to own) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, v in r["domains"].items():
        lines.append(
            f"| {d} | {v['base']:.3f} | {v['specialist']:.3f} | {v['installed']:.3f} | "
            f"{r['accuracy_over_specialist'][d]:.3f} | {r['routing_to_own_expert'][d]:.3f} | "
            f"{r['joint_fine_tune'][d]:.3f} | {r['btx_learned_router'][d]:.3f} | "
            f"{r['random_key_control'][d]['installed']:.3f} ({r['random_key_control'][d]['routing_to_own_expert']:.3f}) | "
            f"{r['cosine_key_control'][d]['installed']:.3f} "
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
        f"examples x {r['config']['epochs']} epochs). Learned routers (BTX-style): the same experts merged under "
        f"learned top-2 routers; only the routers train, for {r['btx_learned_router']['host_training_steps']} host "
        f"steps on the domains and general data ({r['btx_learned_router']['training_seconds']} s); Branch-Train-MiX "
        "itself fine-tunes every weight of the merged model. Random keys: every key the keys' common Gaussian with "
        "its mean moved at random by the keys' own spread. One seed.",
        "",
        f"What routing had to beat: a Gaussian per domain on 4x4-pooled raw pixels, no model at all, tells the "
        f"held-out images of the four domains apart at {r['pixel_control']['accuracy']:.3f} ("
        + ", ".join(f"{d} {v:.3f}" for d, v in r["pixel_control"]["domains"].items()) + "): the shipped domains "
        "differ by their backgrounds.",
        "",
        "Same images: two medical experts trained on the same scans with different question sets ("
        + "; ".join(f"{n}: {', '.join(p)}" for n, p in QUESTION_SETS.items()) + "), installed together: "
        f"{r['same_images']['routing']:.3f} of their held-out tokens go to the expert of the question's set, and "
        f"they keep {r['same_images']['accuracy_over_specialist']:.3f} of their specialists' accuracy ("
        + ", ".join(f"{n} {v['installed']:.3f} against {v['specialist']:.3f}" for n, v in r["same_images"]["experts"].items())
        + ").",
        "",
        "New words and answers per expert (answers its held-out data has in all, and of them the base's): "
        + ", ".join(f"{n} {v['new_words']} words, {v['new_answers']} new answers of {v['answers']} "
                    f"({v['answers_in_base']} the base's)" for n, v in r["experts"].items()) + ".",
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
