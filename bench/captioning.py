"""Image captioning with the tiny Captioner on procedural shapes captions (TensorFlow, CPU).

Trains `Captioner.from_preset("kvlm_tiny", encoder="cnn", sequence_length=32)` with teacher
forcing on image-caption pairs from `kvlm.data.shapes`, then captions a held-out split (new
renders from another seed) with the keras-hub greedy, beam (4 beams) and top-k (k=5)
samplers and scores each against the reference captions with keras-hub's corpus BLEU-4.
The trivial baseline gives every held-out image the most frequent training caption.

Run: `python bench/captioning.py` (writes bench/results/captioning.json and captioning.md).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import common

common.use_tensorflow(__file__)

import keras  # noqa: E402
from kvlm.data import build_vocabulary, make_caption_dataset, make_tokenizer, shapes  # noqa: E402
from kvlm.models import Captioner  # noqa: E402
from kvlm.models.captioning import (  # noqa: E402
    bleu_score,
    generate_captions,
    images_of,
    most_frequent_caption,
)

SAMPLERS = ("greedy", "beam", "top_k")
NUM_EXAMPLES = 8


def parse_args(argv=None):
    parser = common.training_parser(__doc__, train_size=3072, held_out_size=512, epochs=4, batch_size=32,
                                    learning_rate=2e-3, encoder="cnn", seed=0, output=str(common.RESULTS))
    parser.add_argument("--sequence-length", type=int, default=32)
    return parser.parse_args(argv)


def run(args):
    keras.utils.set_random_seed(args.seed)
    train = shapes.generate(args.train_size, seed=11)
    held_out = shapes.generate(args.held_out_size, seed=12)
    vocabulary = build_vocabulary([e.caption for e in train], 200)
    tokenizer = make_tokenizer(vocabulary, args.sequence_length)
    model = Captioner.from_preset(
        "kvlm_tiny", vocabulary_size=len(vocabulary), encoder=args.encoder, sequence_length=args.sequence_length
    )
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
    train_data = make_caption_dataset(
        train, tokenizer, model.image_size, args.batch_size, shuffle=True, seed=args.seed
    )
    held_out_data = make_caption_dataset(held_out, tokenizer, model.image_size, batch_size=256)
    loss_before = float(model.evaluate(held_out_data, verbose=0))
    start = time.perf_counter()
    history = model.fit(train_data, epochs=args.epochs, verbose=0, shuffle=False)
    train_seconds = time.perf_counter() - start
    loss_after = float(model.evaluate(held_out_data, verbose=0))

    references = [e.caption for e in held_out]
    images = images_of(held_out, model.image_size)
    bleu, seconds, captions = {}, {}, {}
    for sampler in SAMPLERS:
        if sampler == "top_k":
            keras.utils.set_random_seed(args.seed)
        start = time.perf_counter()
        captions[sampler] = generate_captions(model, images, tokenizer, sampler=sampler, batch_size=256)
        seconds[sampler] = round(time.perf_counter() - start, 1)
        bleu[sampler] = round(bleu_score(references, captions[sampler]), 4)
    baseline_caption = most_frequent_caption([e.caption for e in train])
    baseline = round(bleu_score(references, [baseline_caption] * len(references)), 4)
    exact = {s: round(sum(c == r for c, r in zip(captions[s], references)) / len(references), 4) for s in SAMPLERS}
    return {
        "model": "Captioner.from_preset('kvlm_tiny', encoder=%r, sequence_length=%d)"
        % (args.encoder, args.sequence_length),
        "parameters": model.count_params(),
        "num_decoder_layers": model.num_decoder_layers,
        "vocabulary_size": len(vocabulary),
        "train_size": args.train_size,
        "held_out_size": args.held_out_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "train_seconds": round(train_seconds, 1),
        "train_loss_per_epoch": [round(float(v), 4) for v in history.history["loss"]],
        "held_out_loss_before": round(loss_before, 4),
        "held_out_loss_after": round(loss_after, 4),
        "bleu": bleu,
        "exact_match": exact,
        "generation_seconds": seconds,
        "baseline": {"caption": baseline_caption, "bleu": baseline},
        "examples": [
            {"reference": references[i], **{s: captions[s][i] for s in SAMPLERS}} for i in range(NUM_EXAMPLES)
        ],
    }


def markdown(result) -> str:
    lines = [
        "# Captioning: tiny Captioner on shapes captions",
        "",
        f"Command: `{result['command']}` ({result['platform']}, Keras {result['keras']}, "
        f"backend {result['backend']}; total {result['total_seconds']} s).",
        "",
        f"Model: `{result['model']}`, {result['parameters']:,} parameters, "
        f"{result['num_decoder_layers']} keras-hub TransformerDecoder layers with cross-attention to "
        "the image tokens; WordPiece vocabulary of "
        f"{result['vocabulary_size']} tokens, captions `[CLS] ... [SEP]`.",
        f"Teacher forcing on {result['train_size']} images for {result['epochs']} epochs "
        f"(batch {result['batch_size']}, Adam {result['learning_rate']}): {result['train_seconds']} s; "
        f"train loss per epoch {result['train_loss_per_epoch']}; held-out token loss "
        f"{result['held_out_loss_before']} -> {result['held_out_loss_after']}.",
        "",
        f"Held-out split: {result['held_out_size']} new images (another seed). Corpus BLEU-4 "
        "(keras-hub `Bleu`, one reference caption per image):",
        "",
        "| decoding | BLEU-4 | exact caption | seconds |",
        "|---|---|---|---|",
    ]
    for sampler in SAMPLERS:
        lines.append(
            f"| {sampler} | {result['bleu'][sampler]:.4f} | {result['exact_match'][sampler]:.4f} | "
            f"{result['generation_seconds'][sampler]} |"
        )
    lines.append(
        f"| baseline: most frequent training caption (\"{result['baseline']['caption']}\") for every image | "
        f"{result['baseline']['bleu']:.4f} | | |"
    )
    lines += [
        "",
        "Beam: 4 beams (`keras_hub.samplers.BeamSampler`); top-k: k=5 (`TopKSampler`). Generation reruns "
        "the decoder on the whole prefix at every step (no key/value cache).",
        "",
        "## Example held-out captions",
        "",
    ]
    for example in result["examples"]:
        lines.append(f"- reference: {example['reference']}")
        for sampler in SAMPLERS:
            lines.append(f"  - {sampler}: {example[sampler]}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    result = run(args)
    result.update(
        command="python bench/captioning.py " + " ".join(sys.argv[1:] if argv is None else argv),
        backend=keras.backend.backend(),
        keras=keras.__version__,
        platform=f"{platform.machine()}, {os.cpu_count()} CPUs",
        total_seconds=round(time.perf_counter() - start, 1),
    )
    result["command"] = result["command"].strip()
    common.write_results(args.output, "captioning", result, markdown(result))
    print(json.dumps({k: result[k] for k in ("bleu", "baseline", "train_seconds", "total_seconds")}, indent=2))


if __name__ == "__main__":
    main()
