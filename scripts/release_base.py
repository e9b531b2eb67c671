"""Trains the general base and writes it as the shipped preset `kvlm/presets/kvlm_tiny_vqa`.

    python scripts/release_base.py                 # trains `kvlm train --task vqa --encoder cnn` (its defaults)
    python scripts/release_base.py --run runs/vqa  # releases a run trained that way

The preset holds the classifier with its preprocessor (keras-hub preset layout) and
`kvlm.json`: the fingerprint experts are trained against, the router keys of its general
data and its held-out accuracy.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a finished `kvlm train --task vqa --encoder cnn` run folder")
    parser.add_argument("--output", default=str(ROOT / "kvlm" / "presets" / "kvlm_tiny_vqa"))
    args = parser.parse_args()

    from kvlm.data import make_dataset
    from kvlm.domain_experts.base import Base
    from kvlm.domain_experts.routing import KEY_EXAMPLES, router_keys
    from kvlm.models import VLMPreprocessor
    from kvlm.runs import TrainConfig, load_run
    from kvlm.training import evaluate, fit
    from kvlm.training.examples import load_examples

    run_dir = args.run
    if run_dir is None:
        run_dir = tempfile.mkdtemp(prefix="kvlm-base-")
        fit(TrainConfig(task="vqa", encoder="cnn", output=run_dir), verbose=2)
    run = load_run(run_dir)
    if run.config.task != "vqa" or run.config.encoder != "cnn" or run.config.preset != "kvlm_tiny":
        raise SystemExit(f"{run_dir} is not a kvlm_tiny vqa run with the CNN encoder")
    model = run.model
    model.preprocessor = VLMPreprocessor(run.tokenizer, model.backbone.image_size, run.answers)
    report = evaluate(run_dir)
    general = load_examples(replace(run.config, train_size=KEY_EXAMPLES, eval_size=1))[0]
    keys = router_keys(model, make_dataset(general, run.tokenizer, run.answers, model.backbone.image_size, 256))
    out = Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    base = Base(model, keys, {"accuracy": report["accuracy"], "eval_examples": report["examples"],
                              "train_examples": run.config.train_size, "epochs": run.config.epochs})
    base.save(out)
    print(f"released {out} (fingerprint {base.fingerprint}, held-out accuracy {report['accuracy']:.4f})")


if __name__ == "__main__":
    main()
