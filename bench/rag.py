"""Retrieval augmentation on product catalogues: accuracy with and without retrieval, index scaling.

The task (`kvlm.data.catalogue`): an image shows one product, the question asks for its
price or aisle, and the answer is only in the store's catalogue. Training examples come
from `--train-catalogues` stores; held-out examples from other stores whose catalogues
no model saw, with new renders.

1. A `DualEncoder` (CLIP) learns product images <-> product names; an index of the 24
   product names ranks the entries of any catalogue (they share the names).
2. `RetrievalAugmentedVLM`: its reader is trained on the top-k entries retrieved from each
   example's own catalogue. Baseline: a `VLMClassifier` of the same preset trained on the
   same examples without retrieval.
3. Held-out accuracy of both; then one held-out store's catalogue goes into the model's
   index, the model is exported as a SavedModel and queried with PNG bytes and questions.
4. Index scaling: the same model with indexes of 10^3 to 10^6 entries (the catalogue plus
   random unit vectors): batch-1 and batch-32 latency, and bytes of index per entry.

Run: `python bench/rag.py` (writes bench/results/rag.json and rag.md).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import common

common.use_tensorflow(__file__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from kvlm.data import (  # noqa: E402
    build_vocabulary,
    catalogue,
    make_context_dataset,
    make_dataset,
    make_tokenizer,
    png_bytes,
)
from kvlm.export import write_saved_model  # noqa: E402
from kvlm.models import (  # noqa: E402
    KnowledgeIndex,
    RetrievalAugmentedVLM,
    RetrievalReader,
    VLMClassifier,
    build_index,
)
from kvlm.tasks.rag.task import (  # noqa: E402
    images_of,
    product_index,
    retrieve_products,
    store_contexts,
    train_retriever,
)

HELD_OUT_STORE = 10_000


def parse_args(argv=None):
    parser = common.training_parser(__doc__, train_size=12000, held_out_size=1000, epochs=8, batch_size=64,
                                    learning_rate=1e-3, encoder="cnn", seed=0, output=str(common.RESULTS))
    parser.add_argument("--train-catalogues", type=int, default=500)
    parser.add_argument("--held-out-catalogues", type=int, default=50)
    parser.add_argument("--retriever-epochs", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--index-sizes", default="1000,10000,100000,1000000")
    return parser.parse_args(argv)


def accuracy(logits, examples) -> float:
    predicted = np.asarray(logits).argmax(-1)
    return float(np.mean([catalogue.ANSWERS[p] == e.answer for p, e in zip(predicted, examples)]))


def compile_classifier(model, args, steps):
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=args.learning_rate, warmup_steps=steps // 20)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def index_scaling(model, index, context_tokenizer, sizes, images, questions, rng):
    """Latency of the whole model (retrieval + reader) with growing indexes."""
    rows = []
    dim = index.embedding_dim
    for size in sizes:
        extra = rng.normal(size=(size - len(index), dim)).astype(np.float32)
        extra /= np.linalg.norm(extra, axis=1, keepdims=True)
        big = KnowledgeIndex(
            index.texts + ["unrelated entry"] * len(extra),
            np.concatenate([index.embeddings, extra]),
            index.keys + ["<random>"] * len(extra),
        )
        scaled = RetrievalAugmentedVLM.from_index(model.reader, model.retriever, big, context_tokenizer, query=model.query)
        call = tf.function(lambda x, m=scaled: m(x, training=False), jit_compile=False, reduce_retracing=True)
        row = {"entries": size, "index_megabytes": round(
            (scaled.index_embeddings.numpy().nbytes + scaled.index_token_ids.numpy().nbytes) / 2**20, 1)}
        for batch in (1, 32):
            inputs = {"images": tf.constant(images[:batch]), "token_ids": tf.constant(questions[:batch])}
            predictions = call(inputs)  # trace
            times = []
            for _ in range(20):
                start = time.perf_counter()
                predictions = call(inputs)
                np.asarray(predictions)
                times.append(time.perf_counter() - start)
            row[f"batch_{batch}_ms"] = round(1000 * float(np.median(times)), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del scaled, big
    return rows


def run(args):
    keras.utils.set_random_seed(args.seed)
    train_stores = list(range(args.train_catalogues))
    held_out_stores = list(range(HELD_OUT_STORE, HELD_OUT_STORE + args.held_out_catalogues))
    train = catalogue.generate(args.train_size, seed=args.seed, catalogue_seeds=train_stores)
    held_out = catalogue.generate(args.held_out_size, seed=args.seed + 1, catalogue_seeds=held_out_stores)
    vocabulary = build_vocabulary(catalogue.vocabulary_texts(train_stores[:50]), 200)
    tokenizer = make_tokenizer(vocabulary, 16)
    context_tokenizer = make_tokenizer(vocabulary, 16)
    answers = list(catalogue.ANSWERS)

    # 1. The retriever and the product-name index (kvlm.tasks.rag.task, as `kvlm train --task rag`).
    start = time.perf_counter()
    retriever = train_retriever(
        train, tokenizer, len(vocabulary), preset="kvlm_tiny", encoder=args.encoder, learning_rate=args.learning_rate,
        batch_size=args.batch_size, epochs=args.retriever_epochs, seed=args.seed,
    )
    retriever_seconds = time.perf_counter() - start
    names = product_index(retriever, tokenizer)
    ranked = retrieve_products(retriever, names, held_out, args.top_k)
    truth = np.array([e.extra["product"] for e in held_out])
    retrieval = {
        "recall_at_1": round(float(np.mean(ranked[:, 0] == truth)), 4),
        f"recall_at_{args.top_k}": round(float(np.mean((ranked == truth[:, None]).any(axis=1))), 4),
        "train_seconds": round(retriever_seconds, 1),
    }
    print(json.dumps({"retriever": retrieval}), flush=True)

    def contexts(examples):
        return store_contexts(retriever, names, examples, args.top_k, context_tokenizer)

    # 2. The reader with retrieval, and the same-size classifier without.
    steps = args.epochs * -(-len(train) // args.batch_size)
    reader = RetrievalReader.from_preset(
        "kvlm_tiny", num_classes=len(answers), vocabulary_size=len(vocabulary), encoder=args.encoder,
        top_k=args.top_k, context_length=context_tokenizer.sequence_length,
    )
    keras.utils.set_random_seed(args.seed)
    rag = RetrievalAugmentedVLM(reader, retriever, len(names))
    compile_classifier(rag, args, steps)
    train_data = make_context_dataset(
        train, contexts(train), tokenizer, answers, rag.backbone.image_size, args.batch_size, shuffle=True, seed=args.seed,
    )
    held_out_contexts = contexts(held_out)
    held_out_data = make_context_dataset(held_out, held_out_contexts, tokenizer, answers, rag.backbone.image_size, 256)
    start = time.perf_counter()
    rag_history = rag.fit(train_data, epochs=args.epochs, validation_data=held_out_data, verbose=2, shuffle=False)
    rag_seconds = time.perf_counter() - start
    with_retrieval = accuracy(rag.predict(held_out_data, verbose=0), held_out)

    keras.utils.set_random_seed(args.seed)
    baseline = VLMClassifier.from_preset(
        "kvlm_tiny", num_classes=len(answers), vocabulary_size=len(vocabulary), encoder=args.encoder
    )
    compile_classifier(baseline, args, steps)
    plain_train = make_dataset(train, tokenizer, answers, baseline.backbone.image_size, args.batch_size, True, seed=args.seed)
    plain_held_out = make_dataset(held_out, tokenizer, answers, baseline.backbone.image_size, 256)
    start = time.perf_counter()
    baseline_history = baseline.fit(plain_train, epochs=args.epochs, validation_data=plain_held_out, verbose=2, shuffle=False)
    baseline_seconds = time.perf_counter() - start
    without_retrieval = accuracy(baseline.predict(plain_held_out, verbose=0), held_out)
    train_accuracy_without = float(baseline_history.history["accuracy"][-1])

    # Reading the wrong store's catalogue: the same retrieved products, another store's entries.
    shifted = [type(e)(**{**e.__dict__, "extra": {**e.extra, "catalogue": e.extra["catalogue"] + 1}}) for e in held_out]
    wrong_store = accuracy(
        rag.predict(make_context_dataset(held_out, contexts(shifted), tokenizer, answers, rag.backbone.image_size, 256), verbose=0),
        held_out,
    )
    fields = np.array([e.extra["field"] for e in held_out])
    chance = float(np.mean(np.where(fields == "price", 1 / len(catalogue.PRICES), 1 / len(catalogue.AISLES))))

    # 3. One held-out store in the model's own index; export; query the SavedModel.
    store = held_out_stores[0]
    store_index = build_index(retriever, tokenizer, catalogue.catalogue(store), keys=catalogue.keys())
    served_model = RetrievalAugmentedVLM.from_index(reader, retriever, store_index, context_tokenizer)
    store_examples = catalogue.generate(256, seed=args.seed + 2, catalogue_seeds=[store])
    store_images = images_of(store_examples)
    store_questions = np.asarray(tokenizer([e.question for e in store_examples]))
    in_graph = accuracy(served_model.predict({"images": store_images, "token_ids": store_questions}, verbose=0), store_examples)
    export_dir = Path(tempfile.mkdtemp()) / "1"
    write_saved_model(served_model, tokenizer, answers, export_dir, model_name="kvlm_rag")
    loaded = tf.saved_model.load(str(export_dir))
    outputs = loaded.signatures["serving_default"](
        image_bytes=tf.constant([png_bytes(e) for e in store_examples]),
        text=tf.constant([e.question for e in store_examples]),
    )
    served_answers = [a.decode() for a in outputs["answer"].numpy()]
    served = float(np.mean([a == e.answer for a, e in zip(served_answers, store_examples)]))
    saved_model_megabytes = sum(f.stat().st_size for f in export_dir.rglob("*") if f.is_file()) / 2**20
    shutil.rmtree(export_dir.parent, ignore_errors=True)

    # 4. Index scaling.
    sizes = [int(s) for s in args.index_sizes.split(",") if s.strip()]
    scaling = index_scaling(served_model, store_index, context_tokenizer, sizes, store_images, store_questions, np.random.default_rng(0))

    return {
        "task": {
            "products": len(catalogue.PRODUCTS),
            "answers": answers,
            "train_catalogues": args.train_catalogues,
            "held_out_catalogues": args.held_out_catalogues,
            "chance": round(chance, 4),
        },
        "retriever": retrieval,
        "with_retrieval": {
            "held_out_accuracy": round(with_retrieval, 4),
            "wrong_store_accuracy": round(wrong_store, 4),
            "train_seconds": round(rag_seconds, 1),
            "parameters": int(sum(np.prod(v.shape) for v in rag.reader.weights)),
            "val_accuracy_per_epoch": [round(float(v), 4) for v in rag_history.history["val_accuracy"]],
        },
        "without_retrieval": {
            "held_out_accuracy": round(without_retrieval, 4),
            "final_train_accuracy": round(train_accuracy_without, 4),
            "train_seconds": round(baseline_seconds, 1),
            "parameters": baseline.count_params(),
            "val_accuracy_per_epoch": [round(float(v), 4) for v in baseline_history.history["val_accuracy"]],
        },
        "served": {
            "store": store,
            "examples": len(store_examples),
            "in_graph_retrieval_accuracy": round(in_graph, 4),
            "saved_model_accuracy": round(served, 4),
            "saved_model_megabytes": round(saved_model_megabytes, 2),
        },
        "index_scaling": scaling,
    }


def markdown(result) -> str:
    r = result
    k = r["config"]["top_k"]
    lines = [
        "# Retrieval augmentation: product catalogues",
        "",
        f"Command: `{r['command']}` ({r['machine']}, Keras backend {r['keras_backend']}, {r['total_seconds']} s).",
        "",
        f"An image shows one of {r['task']['products']} products; the question asks for its price (8 values) "
        "or aisle (4 values), which only the store's catalogue holds. "
        f"Training: {r['config']['train_size']} examples from {r['task']['train_catalogues']} stores. "
        f"Held out: {r['config']['held_out_size']} new renders from {r['task']['held_out_catalogues']} other stores, "
        f"whose catalogues no model saw. Chance: {r['task']['chance']}.",
        "",
        "| model | held-out accuracy | train s |",
        "|---|---|---|",
        f"| `RetrievalAugmentedVLM` (top-{r['config']['top_k']} entries) | **{r['with_retrieval']['held_out_accuracy']}** "
        f"| {r['with_retrieval']['train_seconds']} |",
        f"| `VLMClassifier`, no retrieval | {r['without_retrieval']['held_out_accuracy']} "
        f"| {r['without_retrieval']['train_seconds']} |",
        f"| `RetrievalAugmentedVLM` reading the next store's catalogue | {r['with_retrieval']['wrong_store_accuracy']} | |",
        "",
        f"Retriever (product image -> product name): recall@1 {r['retriever']['recall_at_1']}, "
        f"recall@{k} {r['retriever'][f'recall_at_{k}']}.",
        "",
        f"Served: store {r['served']['store']}'s catalogue in the model's index, exported as a SavedModel "
        f"({r['served']['saved_model_megabytes']} MB) and queried with PNG bytes and questions: accuracy "
        f"{r['served']['saved_model_accuracy']} on {r['served']['examples']} examples "
        f"(in-process, in-graph retrieval: {r['served']['in_graph_retrieval_accuracy']}).",
        "",
        "## Index size and query time (whole model: retrieval + reader, median of 20 calls)",
        "",
        "| entries | index MB | batch 1 ms | batch 32 ms |",
        "|---|---|---|---|",
    ]
    for row in r["index_scaling"]:
        lines.append(f"| {row['entries']:,} | {row['index_megabytes']} | {row['batch_1_ms']} | {row['batch_32_ms']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    result = common.record(__file__, args, argv, run(args), start)
    path = common.write_results(args.output, "rag", result, markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
