"""Adapter experts trained against the released base, installed with no host training, over three seeds.

    python bench/domain_experts.py [--train-size 6000] [--eval-size 1000] [--epochs 6] [--digit-epochs 40] [--seeds 0 1 2]

Per seed, every expert is `kvlm train --task domain_expert` (the default kind: LoRA adapters
through the whole path, its own words and answer head) with the base `kvlm_tiny_vqa` frozen:

- the plugins' domains (legal, medical, retail), installed at once, measured on held-out splits,
  with where routing sends them (on the image part of the routing feature alone, on the question
  part alone, and on both as the model does);
- `pixel_control`: a Gaussian per domain on 4x4-pooled raw pixels, no model at all (what routing
  had to beat);
- `same_images`: two experts trained on the same medical scans with different question sets,
  installed together;
- `abstain`: each domain's held-out inputs with only the other experts installed (and the digits
  folder with the three), against the experts' own held-out inputs;
- `own_folder`: scikit-learn's real digits as a user's folder (`bench/own_folder_expert.py`),
  installed beside the three, against the same folder trained end to end (`kvlm train --data-dir`),
  both with `--augment` (RandAugment, as for any small folder of real images);
- `new_domain`: the digits asked with words and answers the base has none of;
- `cost`: the installed model's time per batch of 64 with eight experts against one;
- controls and baselines: random keys (each expert keyed on a random sample of every domain's
  inputs, so routing knows nothing of the domains), one adapter set trained on the three domains
  jointly (the three experts' steps), and Branch-Train-MiX as the paper runs it: experts branched
  from the base (FFN experts), merged under learned top-2 routers, then every weight of the merged
  model but the base's answer columns trained on the mixed data for one expert's steps.

Top-level figures are means over the seeds; `spread` holds their standard deviations and
`per_seed` every seed's results. Writes bench/results/domain_experts.json and .md.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import common
import numpy as np

DOMAINS = ("legal", "medical", "retail")
# Two question sets about the same medical images (`same_images`), by question prefix.
QUESTION_SETS = {"findings": ("how many", "which organ", "what size"), "lesions": ("what kind", "which side", "is there")}
TARGETS = {  # figure: (path in the results, at least / at most, bound)
    "own-folder specialist": (("own_folder", "specialist"), ">=", 0.97),
    "own-folder installed / specialist": (("own_folder", "installed_over_specialist"), ">=", 0.98),
    "legal specialist": (("domains", "legal", "specialist"), ">=", 0.95),
    "medical specialist": (("domains", "medical", "specialist"), ">=", 0.95),
    "retail specialist": (("domains", "retail", "specialist"), ">=", 0.95),
    "same-images routing": (("same_images", "routing"), ">=", 0.95),
    "same-images accuracy / specialist": (("same_images", "accuracy_over_specialist"), ">=", 0.95),
    "unseen to general": (("abstain", "unseen_to_general"), ">=", 0.95),
    "in-domain kept": (("abstain", "in_domain_kept"), ">=", 0.98),
    "general accuracy drop": (("general_accuracy_drop",), "<=", 0.01),
    "cost ratio, eight experts / one": (("cost", "ratio"), "<=", 1.3),
    "host training steps": (("host_training_steps",), "<=", 0),
}


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


def new_domain_question(index: int, digit: int) -> tuple[str, str]:
    """A digit scan asked with words and answers the base has none of."""
    if index % 2 == 0:
        return "handwritten numeral?", str(digit)
    return "numeral parity?", "even" if digit % 2 == 0 else "odd"


def _train(name: str, root: Path, seed: int, epochs: int, train_size: int | None = None, eval_size: int | None = None,
           datasets: list[str] | None = None, data_dir: Path | None = None, domain: str | None = None,
           task: str = "domain_expert", kind: str = "adapters", augment: bool = False) -> Path:
    """A `kvlm train` run (by default `--task domain_expert`) on `datasets` or the folder `data_dir`;
    returns its folder."""
    from kvlm.runs import TrainConfig
    from kvlm.training import fit

    options = {"expert_name": name, "domain": domain or name, "kind": kind} if task == "domain_expert" else {}
    config = TrainConfig(task=task, output=str(root / name), datasets=datasets,
                         data_dir=str(data_dir) if data_dir else None, train_size=train_size, eval_size=eval_size,
                         epochs=epochs, seed=seed, augment=augment, task_options=options)
    fit(config, verbose=0, checkpoint=False)
    return root / name


def _examples(run_dir: Path) -> tuple[list, list]:
    """The `(train, held_out)` examples of a training run."""
    from kvlm.runs import read_config
    from kvlm.training.examples import load_examples
    from kvlm.training.loop import resolve_config

    return load_examples(resolve_config(read_config(run_dir)))


def _expert(run_dir: Path):
    from kvlm.domain_experts import DomainExpert
    from kvlm.tasks.domain_expert.task import EXPERT_DIR

    return DomainExpert.load(run_dir / EXPERT_DIR)


def _slot_shares(installed, examples, image_size: int) -> dict[str, float]:
    """Share of `examples` each of the installed model's slots answers (`general`: the base)."""
    from kvlm.domain_experts.report import GENERAL, routed_slots

    slots = routed_slots(installed.model, examples, installed.tokenizer, image_size)
    shares = np.bincount(slots, minlength=len(installed.experts) + 1) / len(slots)
    return dict(zip([GENERAL, *installed.experts], shares.round(4).tolist()))


def _features(base, examples, tokenizer) -> np.ndarray:
    """The base's routing features of `examples` (tokenized with the installed `tokenizer`)."""
    from kvlm.data import make_dataset
    from kvlm.domain_experts.routing import base_routing_features

    labels = sorted({e.answer for e in examples})
    return base_routing_features(base, make_dataset(list(examples), tokenizer, labels, base.image_size, 256))


def split_routing(experts, key_features: dict[str, np.ndarray], features: dict[str, np.ndarray]) -> dict:
    """Where each domain's `features` go when routed on the image half or the question half of the
    routing feature alone: each expert's Gaussian key and abstention threshold fitted, as the task
    fits them, on that half of its own `key_features`; `general` when none admits."""
    from keras import ops

    from kvlm.domain_experts.multi_adapter import route
    from kvlm.domain_experts.report import GENERAL
    from kvlm.domain_experts.routing import abstention_threshold
    from kvlm.layers.moe.keys import gaussian_key

    width = next(iter(features.values())).shape[1] // 2
    split = {}
    for part_name, part in (("image", slice(0, width)), ("text", slice(width, 2 * width))):
        keys = [gaussian_key(key_features[e.name][:, part]) for e in experts]
        thresholds = [abstention_threshold(key_features[e.name][:, part]) for e in experts]
        split[part_name] = {}
        for domain, x in features.items():
            slots = ops.convert_to_numpy(route(ops.convert_to_tensor(x[:, part]), np.stack(keys), np.float32(thresholds))[0])
            shares = np.bincount(slots, minlength=len(experts) + 1) / len(slots)
            split[part_name][domain] = dict(zip([GENERAL, *[e.name for e in experts]], shares.round(4).tolist()))
    return split


def random_keyed(experts, pooled: np.ndarray, rng: np.random.Generator) -> list:
    """`experts` each keyed (Gaussian key and abstention threshold) on its own random sample of
    `pooled`, routing features of every domain's inputs mixed, and without their question keys:
    routing that knows no domain."""
    from kvlm.domain_experts.routing import abstention_threshold
    from kvlm.layers.moe.keys import gaussian_key

    keyed = []
    for expert in experts:
        sample = pooled[rng.choice(len(pooled), size=len(pooled) // 2, replace=False)]
        key = gaussian_key(sample)
        keyed.append(replace(expert, keys=key[None], threshold=abstention_threshold(sample), question_key=None,
                             question_threshold=None, image_threshold=None))
    return keyed


def _btx(base, experts, train, steps: int, batch_size: int, learning_rate: float):
    """Branch-Train-MiX: the branched (FFN) experts merged under learned top-2 routers, then every
    weight of the merged model trained on `train` for `steps` steps; returns the `InstalledModel`."""
    import keras

    from kvlm.data import make_dataset
    from kvlm.domain_experts import install_experts
    from kvlm.runs import TrainConfig
    from kvlm.tasks.base import make_optimizer

    merged = install_experts(base, experts, router="learned")  # shares the base's layers: pass a copy
    model = merged.model
    for layer in model._flatten_layers():  # every weight but those made frozen: the base's answer columns
        layer.trainable = True
    model.compile(make_optimizer(TrainConfig(learning_rate=learning_rate), steps),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = make_dataset(train, merged.tokenizer, merged.answers, base.image_size, batch_size, shuffle=True, seed=0)
    model.fit(data.repeat(), steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
    return merged, len(model.trainable_weights), len(model.weights)


def _cost(base, experts, examples: list) -> dict:
    """Time per batch of 64 of the base with one expert installed against eight (the experts under
    eight names), interleaved in one process."""
    from kvlm.data import make_dataset
    from kvlm.domain_experts import install_experts

    eight = [replace(experts[i % len(experts)], name=f"expert_{i}") for i in range(8)]
    one, many = install_experts(base, experts[:1]), install_experts(base, eight)
    labels = sorted({e.answer for e in examples})

    def batch(installed):
        return next(iter(make_dataset(examples[:64], installed.tokenizer, labels, base.image_size, 64)))[0]

    ms = common.batch_ms({"one": (one.model, batch(one)), "eight": (many.model, batch(many))})
    return {"one_expert_ms": round(ms["one"], 2), "eight_experts_ms": round(ms["eight"], 2),
            "ratio": round(ms["eight"] / ms["one"], 3)}


def seed_results(seed: int, args, base, datasets: dict[str, str], root: Path, baselines: bool = True) -> dict:
    """Every figure of one seed (the joint and BTX baselines when `baselines`)."""
    import keras

    from kvlm.data import load_folder, shapes
    from kvlm.domain_experts import Base, install_experts
    from kvlm.domain_experts.report import GENERAL
    from kvlm.domain_experts.routing import KEY_EXAMPLES
    from kvlm.runs import TrainConfig, load_run
    from kvlm.training.evaluation import answer_accuracy
    from kvlm.training.examples import mix_datasets
    from own_folder_expert import write_digit_folders

    keras.utils.set_random_seed(seed)
    root = root / f"seed_{seed}"
    size = base.image_size
    sizes = {"train_size": args.train_size, "eval_size": args.eval_size}
    general = shapes.generate(args.eval_size, seed=1000 + seed)

    def accuracy(installed, examples):
        return answer_accuracy(installed.model, examples, installed.tokenizer, installed.answers, size)

    started = time.perf_counter()
    runs = {d: _train(d, root, seed, args.epochs, datasets=[datasets[d]], **sizes) for d in DOMAINS}
    training_seconds = time.perf_counter() - started
    experts = [_expert(runs[d]) for d in DOMAINS]
    splits = {d: _examples(runs[d]) for d in DOMAINS}
    held_out = {d: splits[d][1] for d in DOMAINS}

    installed = install_experts(base, experts)
    optimizer = getattr(installed.model, "optimizer", None)
    host_steps = 0 if optimizer is None else int(optimizer.iterations)
    base_general, merged_general = (answer_accuracy(base.model, general, base.tokenizer, base.answers, size),
                                    accuracy(installed, general))
    features = {name: _features(base, examples, installed.tokenizer)
                for name, examples in {GENERAL: general, **held_out}.items()}
    key_features = {d: _features(base, splits[d][0][:KEY_EXAMPLES], installed.tokenizer) for d in DOMAINS}
    split = split_routing(experts, key_features, features)
    per_domain = {}
    for d, expert in zip(DOMAINS, experts):
        per_domain[d] = {
            "base": answer_accuracy(base.model, held_out[d], base.tokenizer, base.answers, size),
            "specialist": expert.metrics["accuracy"],
            "installed": accuracy(installed, held_out[d]),
            "routing": {"all": _slot_shares(installed, held_out[d], size),
                        "image": split["image"][d], "text": split["text"][d]},
        }
    general_routing = {"all": _slot_shares(installed, general, size),
                       "image": split["image"][GENERAL], "text": split["text"][GENERAL]}

    # Control: every expert keyed on a random half of all domains' inputs, the base's among them.
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([features[name] for name in features])
    randomized = install_experts(base, random_keyed(experts, pooled, rng))
    random_control = {d: {"installed": accuracy(randomized, held_out[d]),
                          "routing_to_own_expert": _slot_shares(randomized, held_out[d], size)[d]} for d in DOMAINS}
    random_control["general_accuracy"] = accuracy(randomized, general)

    # What routing had to beat: the domains told apart from raw pixels alone.
    train_sets = {GENERAL: shapes.generate(args.train_size, seed=seed, image_size=size)}
    pixels = pixel_control(train_sets | {d: splits[d][0] for d in DOMAINS}, {GENERAL: general} | held_out)

    # Two experts on the same images, told apart only by what is asked.
    folders = same_image_folders(root, round(args.train_size / (1 - TrainConfig.eval_fraction)), seed)
    same_runs = {name: _train(f"medical_{name}", root, seed, args.epochs, data_dir=folder, domain="medical", **sizes)
                 for name, folder in folders.items()}
    same_experts = [_expert(run) for run in same_runs.values()]
    both = install_experts(base, same_experts)
    same_images = {"experts": {}}
    for run, expert in zip(same_runs.values(), same_experts):
        examples = _examples(run)[1]
        same_images["experts"][expert.name] = {"specialist": expert.metrics["accuracy"],
                                               "installed": accuracy(both, examples),
                                               "routing": _slot_shares(both, examples, size)}
    rows = same_images["experts"]
    same_images["routing"] = round(float(np.mean([r["routing"][n] for n, r in rows.items()])), 4)
    same_images["accuracy_over_specialist"] = round(
        float(np.mean([r["installed"] / max(r["specialist"], 1e-9) for r in rows.values()])), 4)

    # A user's own folder of real images, and the same images asked in words the base never saw.
    digits_train, digits_test = write_digit_folders(root / "digits", seed)
    digits_run = _train("digits", root, seed, args.digit_epochs, data_dir=digits_train, domain="handwritten digits",
                        augment=True)
    full_run = _train("digits_full_finetune", root, seed, args.digit_epochs, data_dir=digits_train, task="vqa",
                      augment=True)
    digits_expert = _expert(digits_run)
    with_digits = install_experts(base, experts + [digits_expert])
    digits_examples = load_folder(digits_test)
    specialist, full = load_run(digits_run), load_run(full_run)
    own_folder = {
        "specialist": answer_accuracy(specialist.model, digits_examples, specialist.tokenizer, specialist.answers, size),
        "installed": accuracy(with_digits, digits_examples),
        "full_finetune": answer_accuracy(full.model, digits_examples, full.tokenizer, full.answers, size),
        "routing_to_own_expert": _slot_shares(with_digits, digits_examples, size)["digits"],
    }
    own_folder["installed_over_specialist"] = round(own_folder["installed"] / max(own_folder["specialist"], 1e-9), 4)

    new_train, new_test = write_digit_folders(root / "new_domain", seed, ask=new_domain_question)
    new_run = _train("numerals", root, seed, args.digit_epochs, data_dir=new_train, domain="numerals", augment=True)
    new_expert = _expert(new_run)
    with_new = install_experts(base, experts + [new_expert])
    new_examples = load_folder(new_test)
    new_specialist = load_run(new_run)
    question_words = {w.strip("?") for e in new_examples for w in e.question.lower().split()}
    new_domain = {
        "domain": "numerals (the digits folder asked in new words)",
        "new_words": len(new_expert.words), "answers": len(new_expert.answers),
        "question_words_in_base": len(question_words & set(base.vocabulary)),
        "answers_in_base": len({e.answer for e in new_examples} & set(base.answers)),
        "before": answer_accuracy(base.model, new_examples, base.tokenizer, base.answers, size),
        "after": accuracy(with_new, new_examples),
        "specialist": answer_accuracy(new_specialist.model, new_examples, new_specialist.tokenizer,
                                      new_specialist.answers, size),
        "general_after": accuracy(with_new, general),
    }

    # Abstention: inputs of a domain no installed expert was trained for go to the base.
    unseen = {d: _slot_shares(install_experts(base, [e for e in experts if e.name != d]), held_out[d], size)[GENERAL]
              for d in DOMAINS}
    unseen["digits"] = _slot_shares(installed, digits_examples, size)[GENERAL]
    kept = {d: per_domain[d]["routing"]["all"][d] for d in DOMAINS}
    abstain = {"unseen_to_general": round(float(np.mean(list(unseen.values()))), 4),
               "in_domain_kept": round(float(np.mean(list(kept.values()))), 4),
               "unseen": unseen, "kept": kept, "general_kept_by_base": general_routing["all"][GENERAL]}

    mixed_batch = [e for group in [general, *held_out.values()] for e in group[:16]]
    results = {
        "routing_to_own_expert": kept,
        "accuracy_over_specialist": {d: round(per_domain[d]["installed"] / max(per_domain[d]["specialist"], 1e-9), 4)
                                     for d in DOMAINS},
        "general_accuracy_drop": round(base_general - merged_general, 4),
        "host_training_steps": host_steps,
        "pixel_control": pixels,
        "same_images": same_images,
        "abstain": abstain,
        "own_folder": own_folder,
        "new_domain": new_domain,
        "cost": _cost(base, experts, mixed_batch),
        "general_accuracy": {"base": base_general, "installed": merged_general},
        "domains": per_domain,
        "general_routing": general_routing,
        "random_key_control": random_control,
        "experts": {e.name: {"new_words": len(e.words), "answers": len(e.answers),
                             "answers_in_base": len(set(e.answers) & set(base.answers))} for e in experts},
        "expert_training_seconds": round(training_seconds, 1),
    }
    if not baselines:
        return results

    # Baseline: one adapter set trained on the three domains jointly, with the three experts' steps.
    joint = load_run(_train("joint", root, seed, args.epochs, datasets=[datasets[d] for d in DOMAINS],
                            domain="all", train_size=args.train_size * len(DOMAINS),
                            eval_size=args.eval_size * len(DOMAINS)))
    joint_results = {d: answer_accuracy(joint.model, held_out[d], joint.tokenizer, joint.answers, size)
                     for d in DOMAINS}
    joint_results["general"] = answer_accuracy(joint.model, general, joint.tokenizer, joint.answers, size)

    # Baseline: Branch-Train-MiX, every weight of the merged model trained.
    branches = [_expert(_train(f"{d}_branch", root, seed, args.epochs, datasets=[datasets[d]], kind="ffn", **sizes))
                for d in DOMAINS]
    mixed = mix_datasets([datasets[d] for d in DOMAINS], args.train_size * len(DOMAINS), len(DOMAINS), seed, size)[0]
    mixed += shapes.generate(args.train_size, seed=seed, image_size=size)
    btx_steps = args.epochs * (args.train_size // 64)
    started = time.perf_counter()
    btx, trainable, weights = _btx(Base.load("kvlm_tiny_vqa"), branches, mixed, btx_steps, 64, 1e-3)
    btx_results = {d: accuracy(btx, held_out[d]) for d in DOMAINS} | {
        "general": accuracy(btx, general), "host_training_steps": btx_steps,
        "trainable_weights": trainable, "weights": weights,
        "training_seconds": round(time.perf_counter() - started, 1)}

    return results | {"joint_fine_tune": joint_results, "btx_learned_router": btx_results}


def _combine(per_seed: list, reduce) -> object:
    """`per_seed` results merged leaf by leaf (each key over the seeds that have it): numbers by
    `reduce`, anything else from the first seed."""
    first = per_seed[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for r in per_seed for k in r))
        return {k: _combine([r[k] for r in per_seed if k in r], reduce) for k in keys}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        value = reduce(per_seed)
        return None if value is None else round(float(value), 4)
    return first


def _get(results: dict, path: tuple[str, ...]):
    for key in path:
        results = results[key]
    return results


def main() -> None:
    parser = common.training_parser(__doc__, train_size=6000, eval_size=1000, epochs=6, output=common.RESULTS)
    parser.add_argument("--digit-epochs", type=int, default=40,
                        help="epochs of the digits experts and full fine-tune, all trained with --augment "
                             "(as bench/own_folder_expert.py)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baseline-seeds", type=int, nargs="+", default=None,
                        help="seeds that also run the joint and BTX baselines (default: every seed)")
    args = parser.parse_args()
    common.use_tensorflow(__file__)

    import tempfile

    import keras

    from kvlm.domain_experts import Base
    from kvlm.domain_experts.report import domain_datasets

    started = time.perf_counter()
    base = Base.load("kvlm_tiny_vqa")
    datasets = domain_datasets(DOMAINS)
    missing = sorted(set(DOMAINS) - set(datasets))
    if missing:
        raise SystemExit(f"no installed dataset of the {', '.join(missing)} domain (pip install kvlm-<domain>)")
    partial = Path(tempfile.gettempdir()) / "kvlm-domain-experts-seeds.json"  # kept should a later seed fail
    with tempfile.TemporaryDirectory(prefix="kvlm-domain-experts-") as workspace:
        per_seed = []
        for seed in args.seeds:
            baselines = args.baseline_seeds is None or seed in args.baseline_seeds
            per_seed.append(seed_results(seed, args, base, datasets, Path(workspace), baselines))
            partial.write_text(json.dumps(per_seed), encoding="utf-8")
            print(f"seed {seed} done in {time.perf_counter() - started:.0f} s (results so far: {partial})", flush=True)
    config = {"base": "kvlm_tiny_vqa", "base_fingerprint": base.fingerprint, "train_size": args.train_size,
              "eval_size": args.eval_size, "epochs": args.epochs, "digit_epochs": args.digit_epochs,
              "seeds": args.seeds, "baseline_seeds": args.baseline_seeds or args.seeds,
              "command": " ".join(["python bench/domain_experts.py", *sys.argv[1:]]),
              "keras_backend": keras.backend.backend(), "machine": common.machine(),
              "total_seconds": round(time.perf_counter() - started, 1)}
    results = summarise(per_seed, config)
    markdown = _markdown(results)
    common.write_results(args.output, "domain_experts", results, markdown)
    print(markdown)


def summarise(per_seed: list[dict], config: dict) -> dict:
    """The seeds' results: means, `spread` (standard deviations; None for a figure of one seed),
    `targets` (each target's mean and whether it is met), `per_seed` and `config`."""
    results = _combine(per_seed, np.mean)
    results["spread"] = _combine(per_seed, lambda v: np.std(v, ddof=1) if len(v) > 1 else None)
    results["targets"] = {}
    for name, (path, sense, bound) in TARGETS.items():
        value = _get(results, path)
        results["targets"][name] = {"value": value, "bound": f"{sense} {bound}",
                                    "met": bool(value >= bound if sense == ">=" else value <= bound)}
    results["per_seed"] = dict(zip(map(str, config["seeds"]), per_seed))
    results["config"] = config
    return results


def _pm(results: dict, path: tuple[str, ...]) -> str:
    """`mean ± std` of the figure at `path` (the figure alone where one seed measured it)."""
    spread = _get(results["spread"], path)
    return f"{_get(results, path):.3f}" + ("" if spread is None else f" ± {spread:.3f}")


def _markdown(r: dict) -> str:
    c = r["config"]
    names = ["general", *DOMAINS]
    lines = [
        "# Adapter experts installed into the released base (`python bench/domain_experts.py`)",
        "",
        f"Base `kvlm_tiny_vqa` ({c['base_fingerprint']}); each expert trained on {c['train_size']} examples x "
        f"{c['epochs']} epochs with the base frozen (LoRA adapters through the whole path); held-out {c['eval_size']} "
        f"per domain; seeds {', '.join(map(str, c['seeds']))}: mean ± standard deviation. Host training steps after "
        f"installing: {r['host_training_steps']:.0f}. {c['machine']}, {c['total_seconds'] / 60:.0f} min.",
        "",
        "| domain | base alone | specialist | installed (all experts) | installed / specialist | routed to own expert | "
        "joint adapters | BTX | random keys (routed to own) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in DOMAINS:
        rk = r["random_key_control"][d]
        lines.append(
            f"| {d} | {_pm(r, ('domains', d, 'base'))} | {_pm(r, ('domains', d, 'specialist'))} | "
            f"{_pm(r, ('domains', d, 'installed'))} | {_pm(r, ('accuracy_over_specialist', d))} | "
            f"{_pm(r, ('routing_to_own_expert', d))} | {_pm(r, ('joint_fine_tune', d))} | {_pm(r, ('btx_learned_router', d))} | "
            f"{rk['installed']:.3f} ({rk['routing_to_own_expert']:.3f}) |")
    lines += [
        f"| general (shapes) | {_pm(r, ('general_accuracy', 'base'))} | - | {_pm(r, ('general_accuracy', 'installed'))} "
        f"| drop {_pm(r, ('general_accuracy_drop',))} | {_pm(r, ('general_routing', 'all', 'general'))} | "
        f"{_pm(r, ('joint_fine_tune', 'general'))} | {_pm(r, ('btx_learned_router', 'general'))} | "
        f"{r['random_key_control']['general_accuracy']:.3f} |",
        "",
        f"Baselines measured on seed{'s' if len(c['baseline_seeds']) > 1 else ''} "
        f"{', '.join(map(str, c['baseline_seeds']))}. "
        f"Joint adapters: one adapter set trained on the three domains mixed ({len(DOMAINS)} x {c['train_size']} "
        f"examples x {c['epochs']} epochs). BTX (Branch-Train-MiX): experts branched from the base and trained apart "
        f"(FFN experts), merged under learned top-2 routers, then every weight of the merged model trained for "
        f"{r['btx_learned_router']['host_training_steps']:.0f} host steps on the domains and general data mixed "
        f"({r['btx_learned_router']['trainable_weights']:.0f} of {r['btx_learned_router']['weights']:.0f} weights: all but the "
        "MoE statistics, the head's keys and the base's answer columns). Random keys: each "
        "expert keyed, threshold included, on a random half of all four domains' inputs.",
        "",
        f"What routing had to beat: a Gaussian per domain on 4x4-pooled raw pixels, no model at all, tells the "
        f"held-out images of the four domains apart at {_pm(r, ('pixel_control', 'accuracy'))}.",
        "",
        "| | figure | target |",
        "|---|---|---|",
        f"| same images: routed to the expert of the question's set | {_pm(r, ('same_images', 'routing'))} | >= 0.95 |",
        f"| same images: installed / specialist | {_pm(r, ('same_images', 'accuracy_over_specialist'))} | >= 0.95 |",
        f"| abstain: an unseen domain's inputs to the base | {_pm(r, ('abstain', 'unseen_to_general'))} | >= 0.95 |",
        f"| abstain: the experts' own inputs kept | {_pm(r, ('abstain', 'in_domain_kept'))} | >= 0.98 |",
        f"| own folder (digits, `--augment`, {c['digit_epochs']} epochs): specialist | "
        f"{_pm(r, ('own_folder', 'specialist'))} | >= 0.97 |",
        f"| own folder: installed | {_pm(r, ('own_folder', 'installed'))} | >= 0.98 of specialist "
        f"({_pm(r, ('own_folder', 'installed_over_specialist'))}) |",
        f"| own folder: full fine-tune (`kvlm train --data-dir --augment`) | {_pm(r, ('own_folder', 'full_finetune'))} "
        "| - |",
        f"| new domain: base alone / installed / specialist | {_pm(r, ('new_domain', 'before'))} / "
        f"{_pm(r, ('new_domain', 'after'))} / {_pm(r, ('new_domain', 'specialist'))} | - |",
        f"| cost: batch of 64, one expert / eight (ms) | {_pm(r, ('cost', 'one_expert_ms'))} / "
        f"{_pm(r, ('cost', 'eight_experts_ms'))}, ratio {_pm(r, ('cost', 'ratio'))} | ratio <= 1.3 |",
        "",
        "Same images: two medical experts trained on the same scans with different question sets ("
        + "; ".join(f"{n}: {', '.join(p)}" for n, p in QUESTION_SETS.items()) + "). Abstain: each domain's held-out "
        "inputs with the other two experts installed, and the digits with the three (" + ", ".join(
            f"{d} {v:.3f}" for d, v in r["abstain"]["unseen"].items()) + "). New domain: the digits asked "
        f"\"handwritten numeral?\" (answers 0-9) and \"numeral parity?\" ({r['new_domain']['question_words_in_base']:.0f} "
        f"question words and {r['new_domain']['answers_in_base']:.0f} answers in the base's).",
        "",
        "Targets: " + "; ".join(f"{n} {t['value']:.3f} ({t['bound']}: {'met' if t['met'] else 'not met'})"
                                for n, t in r["targets"].items()) + ".",
        "",
        "Routing heatmap: share of each domain's held-out examples each expert answers (`general`: the base), as "
        "the model routes (all), and on the image half or the question half of the routing feature alone (each "
        "expert's key and threshold fitted, as the task fits them, on that half of its training examples' features).",
        "",
        "| data | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = [("general", r["general_routing"])] + [(d, r["domains"][d]["routing"]) for d in DOMAINS]
    for label, routing in rows:
        for kind in ("all", "image", "text"):
            lines.append(f"| {label} ({kind}) | " + " | ".join(f"{routing[kind][n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
