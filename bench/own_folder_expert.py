"""A third party's expert from their own folder of real images, published as a plugin, installed with no training.

    python bench/own_folder_expert.py [--epochs 40]

The walk-through of docs/plugins.md ("Train an expert on your own images") on data kvlm does
not ship: the 1,797 real handwritten digits that scikit-learn bundles (`load_digits`, 8x8
scans upscaled to 32x32). It writes them as folders of PNGs plus `annotations.jsonl`
(train 80% / test 20%), trains the expert with `kvlm train --task domain_expert --data-dir`
(the default kind: LoRA adapters through the whole path; `--augment`, RandAugment, as for any
small folder of real images), pip-installs the plugin distribution
the task writes, builds the base with the installed experts (`install_experts(base,
"installed")`) and scores base, specialist and installed model on the test folder, beside a
full fine-tune: a VQA model trained end to end on the same folder for the same epochs, also
augmented (`kvlm train --task vqa --data-dir --augment`). Writes bench/results/own_folder_expert.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_question(index: int, digit: int) -> tuple[str, str]:
    """The question and answer asked about digit scan `index`: its name, or whether it is even."""
    if index % 2 == 0:
        return "what digit is handwritten here?", WORDS[digit]
    return "is the handwritten digit even or odd?", "even" if digit % 2 == 0 else "odd"


def write_digit_folders(root: Path, seed: int = 0, ask=digit_question) -> tuple[Path, Path]:
    """The digits as `root/train` and `root/test` folders of PNGs with `annotations.jsonl`, each
    scan asked `ask(index, digit) -> (question, answer)`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    folders = []
    for split, indices in (("train", order[:cut]), ("test", order[cut:])):
        folder = root / split
        (folder / "images").mkdir(parents=True)
        lines = []
        for i in indices:
            pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            image = Image.fromarray(np.kron(pixels, np.ones((4, 4), np.uint8))).convert("RGB")
            name = f"images/{i:04d}.png"
            image.save(folder / name)
            digit = int(digits.target[i])
            question, answer = ask(int(i), digit)
            lines.append(json.dumps({"image": name, "question": question, "answer": answer}))
        (folder / "annotations.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        folders.append(folder)
    return folders[0], folders[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvlm-own-folder-") as tmp:
        root = Path(tmp)
        train, test = write_digit_folders(root)
        run = root / "digits_run"
        command = [sys.executable, "-m", "kvlm", "train", "--task", "domain_expert", "--data-dir", str(train),
                   "--domain", "handwritten digits", "--expert-name", "digits", "--epochs", str(args.epochs),
                   "--augment", "--output", str(run), "--no-tensorboard"]
        subprocess.run(command, check=True)
        full = root / "full_finetune"
        subprocess.run([sys.executable, "-m", "kvlm", "train", "--task", "vqa", "--data-dir", str(train), "--epochs",
                        str(args.epochs), "--augment", "--output", str(full), "--no-tensorboard"], check=True)
        site = root / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                        "--disable-pip-version-check", "--target", str(site), str(run / "plugin")], check=True)
        sys.path.insert(0, str(site))

        from kvlm.data import load_folder, shapes
        from kvlm.experts import refresh
        from kvlm.domain_experts import Base, install_experts
        from kvlm.domain_experts.report import GENERAL, routing_report
        from kvlm.runs import load_run
        from kvlm.training.evaluation import answer_accuracy

        refresh()
        base = Base.load("kvlm_tiny_vqa")
        installed = install_experts(base, "installed")
        specialist = load_run(run)
        full_finetune = load_run(full)
        examples = load_folder(test)
        general = shapes.generate(1000, seed=10_000)
        results = {
            "data": "scikit-learn load_digits (1,797 real 8x8 handwritten digits, upscaled to 32x32)",
            "train_examples": len(load_folder(train)),
            "test_examples": len(examples),
            "epochs": args.epochs,
            "installed_experts": installed.experts,
            "host_training_steps": 0,
            "base": answer_accuracy(base.model, examples, base.tokenizer, base.answers, 32),
            "specialist": answer_accuracy(specialist.model, examples, specialist.tokenizer, specialist.answers, 32),
            "installed": answer_accuracy(installed.model, examples, installed.tokenizer, installed.answers, 32),
            "full_finetune": answer_accuracy(full_finetune.model, examples, full_finetune.tokenizer,
                                             full_finetune.answers, 32),
            "general_base": answer_accuracy(base.model, general, base.tokenizer, base.answers, 32),
            "general_installed": answer_accuracy(installed.model, general, installed.tokenizer, installed.answers, 32),
            "routing": routing_report(installed.model, examples, installed.tokenizer, installed.answers, 32,
                                      [GENERAL, *installed.experts]),
        }
        results["installed_over_specialist"] = round(results["installed"] / max(results["specialist"], 1e-9), 4)
    markdown = "\n".join([
        "# An expert from a user's own folder of real images (`python bench/own_folder_expert.py`)",
        "",
        f"{results['data']}: {results['train_examples']} training and {results['test_examples']} test examples "
        f"(digit name or even / odd); expert trained {results['epochs']} epochs with `kvlm train --task "
        f"domain_expert --data-dir --augment`, pip-installed from the plugin distribution it wrote, installed with "
        f"{results['host_training_steps']} host training steps (installed: {', '.join(results['installed_experts'])}).",
        "",
        "| | base alone | specialist | installed | installed / specialist | full fine-tune |",
        "|---|---|---|---|---|---|",
        f"| digits test folder | {results['base']:.3f} | {results['specialist']:.3f} | {results['installed']:.3f} | "
        f"{results['installed_over_specialist']:.3f} | {results['full_finetune']:.3f} |",
        f"| general (shapes) | {results['general_base']:.3f} | - | {results['general_installed']:.3f} | - | - |",
        "",
        "Where the installed model routes the digits test folder: "
        + ", ".join(f"{name} {share:.3f}" for name, share in results["routing"].items()) + ".",
        "",
    ])
    common.write_results(common.RESULTS, "own_folder_expert", results, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
