"""The rag task: a `RetrievalAugmentedVLM` answering from product catalogues (`kvlm.data.catalogue`).

`kvlm.training.fit` trains it when `TrainConfig.task` is `rag` (options in `task_options`, see
`kvlm.tasks.rag.INFO`), as `bench/rag.py` does:

1. Examples: `train_size` from stores `0 .. train_catalogues - 1`, `eval_size` held out from
   the `HELD_OUT_CATALOGUES` stores `HELD_OUT_STORE ..` that no training example used. One
   vocabulary of every text of the task (`catalogue.vocabulary_texts`).
2. The retriever (the task's `pretrain` hook): a CLIP `DualEncoder` trained `retriever_epochs` epochs on image / product-name
   pairs (`train_retriever`); an index of the 24 product names ranks the entries of every
   catalogue (`product_index`).
3. The reader: trained `epochs` epochs on the `top_k` entries retrieved from each example's own
   store (`store_contexts`; `context_ids` given, so the model skips in-graph retrieval).
4. The catalogue of `index_store` (a held-out store by default) goes into the model's own index
   (`RetrievalAugmentedVLM.from_index`), and that model is saved: it answers images and
   questions alone, with in-graph retrieval, and `kvlm export` carries the index.

The run folder is a classifier run folder (`model.keras`, `checkpoint.keras`, `vocabulary.txt`,
`answers.txt`, `run.json` with `task: rag`, `history.csv`, `training_curves.png`), so
`load_run`, `kvlm evaluate` and `kvlm export` treat it as one, plus `index/` (the
`KnowledgeIndex` of the index store) and `rag.json` (`rag_report`). `attach_index` (`kvlm
index attach`) copies a run with another index in its model: a new catalogue without retraining.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kvlm.data import build_vocabulary, catalogue, make_context_dataset, make_dataset, make_pair_dataset, make_tokenizer
from kvlm.models import (
    DualEncoder,
    KnowledgeIndex,
    RetrievalAugmentedVLM,
    RetrievalReader,
    build_index,
    query_embeddings,
)
from kvlm.runs import (
    BACKUP_DIR,
    CHECKPOINT_FILE,
    LOGS_DIR,
    MODEL_FILE,
    RUN_FILE,
    Run,
    TrainConfig,
    load_run,
    read_vocabulary,
    write_config,
)
from kvlm.tasks.base import ClassifierTask, TrainData, trained_line
from kvlm.tasks.rag import INFO
from kvlm.training.distribution import Distribution
from kvlm.training.tracing import build_before_tracing

RAG_FILE = "rag.json"
INDEX_DIR = "index"
# The trained retriever alone, kept while the reader trains: a run resumed from its backup reuses it.
RETRIEVER_FILE = "retriever.keras"
# Held-out examples come from stores HELD_OUT_STORE .. HELD_OUT_STORE + HELD_OUT_CATALOGUES - 1.
HELD_OUT_STORE = 10_000
HELD_OUT_CATALOGUES = 50
# Tokens per catalogue entry the reader reads (an entry is at most 13 with [CLS] and [SEP]).
CONTEXT_LENGTH = 16
# Stores whose entries go into the vocabulary texts (every price and aisle word is added anyway).
VOCABULARY_STORES = 50
# Seed offsets of the held-out examples and of the fresh examples of the index store.
HELD_OUT_SEED, INDEX_STORE_SEED = 1, 2


def check_options(config: TrainConfig) -> None:
    """Raises `ValueError` for option values the rag task cannot use."""
    options = config.options
    products = len(catalogue.PRODUCTS)
    if not 1 <= options["top_k"] <= products:
        raise ValueError(f"`top_k` must be between 1 and the {products} catalogue entries. Received: top_k={options['top_k']}")
    if not 1 <= options["train_catalogues"] <= HELD_OUT_STORE:
        raise ValueError(
            f"`train_catalogues` must be between 1 and {HELD_OUT_STORE} (held-out stores start at {HELD_OUT_STORE}). "
            f"Received: train_catalogues={options['train_catalogues']}"
        )
    values = {"retriever_epochs": options["retriever_epochs"], "train_size": config.train_size, "eval_size": config.eval_size}
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1 for the rag task. Received: {name}={value}")
    if options["index_store"] is None:
        raise ValueError("`index_store` must be a store seed: its catalogue goes into the trained model's index.")


def train_stores(config: TrainConfig) -> list[int]:
    """The training stores `0 .. train_catalogues - 1`."""
    return list(range(config.options["train_catalogues"]))


def held_out_stores() -> list[int]:
    """The `HELD_OUT_CATALOGUES` held-out stores from `HELD_OUT_STORE` on."""
    return list(range(HELD_OUT_STORE, HELD_OUT_STORE + HELD_OUT_CATALOGUES))


def rag_examples(config: TrainConfig, image_size: int) -> tuple[list, list]:
    """`(train, held_out)` catalogue examples: the training stores, and held-out stores no training example used."""
    train = catalogue.generate(config.train_size, seed=config.seed, catalogue_seeds=train_stores(config), image_size=image_size)
    held_out = catalogue.generate(
        config.eval_size, seed=config.seed + HELD_OUT_SEED, catalogue_seeds=held_out_stores(), image_size=image_size
    )
    return train, held_out


def index_store_examples(config: TrainConfig, size: int | None = None, image_size: int = 32) -> list:
    """`size` (default `eval_size`) fresh examples of the store whose catalogue is in a rag run's index."""
    options = config.options
    if options["index_store"] is None:
        raise ValueError(
            f"The index of this run ({options['index_dir']}) is not a product catalogue: there are no examples to "
            "generate for it. Evaluate on a folder of examples instead (`kvlm evaluate --data-dir DIR`)."
        )
    size = config.eval_size if size is None else size
    return catalogue.generate(
        size, seed=config.seed + INDEX_STORE_SEED, catalogue_seeds=[options["index_store"]], image_size=image_size
    )


def rag_vocabulary(config: TrainConfig) -> list[str]:
    """The vocabulary of questions, product names and catalogue entries."""
    texts = catalogue.vocabulary_texts(train_stores(config)[:VOCABULARY_STORES])
    return build_vocabulary(texts, config.vocabulary_size)


def images_of(examples: Sequence) -> np.ndarray:
    """`(n, S, S, 3)` float32 images in [0, 1] of generated examples."""
    return np.stack([e.image for e in examples]).astype(np.float32) / 255.0


def train_retriever(
    examples: Sequence,
    tokenizer,
    vocabulary_size: int,
    *,
    preset: str = "kvlm_tiny",
    encoder: str = "cnn",
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    epochs: int = 3,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    verbose: int | str = 0,
) -> DualEncoder:
    """A CLIP `DualEncoder` trained with Adam on `examples`' image / caption (product name) pairs.

    `overrides` go to the preset (fusion settings, which a dual encoder lacks, are dropped).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if k not in ("num_fusion_layers", "moe")}
    model = DualEncoder.from_preset(preset, vocabulary_size=vocabulary_size, encoder=encoder, loss="clip", **overrides)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    data = make_pair_dataset(examples, tokenizer, model.image_size, batch_size, shuffle=True, seed=seed)
    build_before_tracing(model, data.element_spec)
    model.fit(data, epochs=epochs, verbose=verbose, shuffle=False)
    return model


def without_optimizer(model: keras.Model) -> keras.Model:
    """An uncompiled copy of `model` with its weights: a frozen retriever carries no optimizer
    state into the files of the model holding it (which Keras would warn about on every load)."""
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def product_index(retriever: DualEncoder, tokenizer) -> KnowledgeIndex:
    """An index of the product names: its ids rank the entries of every catalogue (they share the names)."""
    return build_index(retriever, tokenizer, catalogue.keys())


def retrieve_products(retriever: DualEncoder, names: KnowledgeIndex, examples: Sequence, top_k: int) -> np.ndarray:
    """`(n, top_k)` product ids, best first, retrieved for `examples`' images."""
    _, ids = names.search(query_embeddings(retriever, images=images_of(examples)), top_k)
    return ids


def store_contexts(
    retriever: DualEncoder, names: KnowledgeIndex, examples: Sequence, top_k: int, context_tokenizer
) -> np.ndarray:
    """`(n, top_k, context_length)` token ids of the entries retrieved for each example from its own store."""
    ids = retrieve_products(retriever, names, examples, top_k)
    return catalogue.retrieved_contexts(examples, ids, context_tokenizer)


def retriever_recall(ids: np.ndarray, examples: Sequence) -> dict[str, float]:
    """Recall@1 and recall@k (k = `ids.shape[1]`) of retrieved product ids against `examples`' products."""
    truth = np.array([e.extra["product"] for e in examples])
    return {
        "recall@1": float(np.mean(ids[:, 0] == truth)),
        f"recall@{ids.shape[1]}": float(np.mean((ids == truth[:, None]).any(axis=1))),
    }


def retriever_fingerprint(dual_encoder: keras.Model) -> str:
    """A short hash of a dual encoder's weights, recorded in the indexes it builds."""
    digest = hashlib.sha256()
    for weight in dual_encoder.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:16]


def store_index(retriever: DualEncoder, tokenizer, store: int, model_dir: str | Path | None = None) -> KnowledgeIndex:
    """The catalogue of `store`, keyed by product names, with `kvlm index build`'s metadata."""
    index = build_index(retriever, tokenizer, catalogue.catalogue(store), keys=catalogue.keys())
    index.metadata = {
        "model": str(Path(model_dir).resolve()) if model_dir is not None else None,
        "embedding": "text",
        "catalogue": int(store),
        "retriever": retriever_fingerprint(retriever),
    }
    return index


def _accuracy(logits, examples: Sequence) -> float:
    predicted = np.asarray(logits).argmax(axis=-1)
    return float(np.mean([catalogue.ANSWERS[p] == e.answer for p, e in zip(predicted, examples)]))


def chance_accuracy(examples: Sequence) -> float:
    """The accuracy of guessing a value of the asked field (1/8 for prices, 1/4 for aisles)."""
    per_field = {"price": 1 / len(catalogue.PRICES), "aisle": 1 / len(catalogue.AISLES)}
    return float(np.mean([per_field[e.extra["field"]] for e in examples]))


def rag_report(
    config: TrainConfig,
    held_out: Sequence,
    held_out_accuracy: float,
    recall: dict[str, float],
    retriever_seconds: float,
    store_examples: Sequence,
    store_accuracy: float,
) -> dict[str, Any]:
    """The content of `rag.json`.

    `held_out_accuracy`: on unseen stores, each example reading the entries retrieved from its
    own store; `retriever`: recall@1 and recall@top_k of the product (held-out images);
    `index_store`: accuracy of the saved model alone (in-graph retrieval from its index) on
    fresh examples of the index store; `chance`: guessing a value of the asked field.
    """
    options = config.options
    return {
        "top_k": options["top_k"],
        "train_catalogues": options["train_catalogues"],
        "held_out_catalogues": HELD_OUT_CATALOGUES,
        "held_out_stores": [HELD_OUT_STORE, HELD_OUT_STORE + HELD_OUT_CATALOGUES - 1],
        "held_out_examples": len(held_out),
        "held_out_accuracy": held_out_accuracy,
        "chance": chance_accuracy(held_out),
        "retriever": {"epochs": options["retriever_epochs"], **recall, "train_seconds": retriever_seconds},
        "index_store": {
            "store": options["index_store"],
            "entries": len(catalogue.PRODUCTS),
            "examples": len(store_examples),
            "in_graph_accuracy": store_accuracy,
        },
    }


def format_rag(report: dict[str, Any]) -> str:
    """The figures of a `rag.json` report as text."""
    k, store = report["top_k"], report["index_store"]
    retriever = report["retriever"]
    return "\n".join([
        f"held-out accuracy {report['held_out_accuracy']:.4f} on {report['held_out_examples']} examples of "
        f"{report['held_out_catalogues']} unseen stores (top-{k} entries of each store; chance {report['chance']:.4f})",
        f"retriever: recall@1 {retriever['recall@1']:.4f}, recall@{k} {retriever[f'recall@{k}']:.4f} on held-out images",
        f"index store {store['store']}: accuracy {store['in_graph_accuracy']:.4f} on {store['examples']} fresh examples "
        "with in-graph retrieval (the saved model alone)",
    ])


class RagTask(ClassifierTask):
    """Retriever (`pretrain`), then reader, in a `RetrievalAugmentedVLM` holding the index store's catalogue."""

    info = INFO
    export_description = ClassifierTask.export_description.replace(
        ": ", " (answers from the model's built-in index): ", 1
    )

    def configure(self, config: TrainConfig) -> TrainConfig:
        check_options(config)
        return config

    def prepare(self, config: TrainConfig) -> TrainData:
        """Catalogue examples (`rag_examples`), the task's vocabulary, tokenizers and answers."""
        preset = self.preset(config)
        train, held_out = rag_examples(config, preset["image_size"])
        vocabulary = rag_vocabulary(config)
        return TrainData(
            train, held_out, vocabulary, make_tokenizer(vocabulary, preset["sequence_length"]), preset["image_size"],
            list(catalogue.ANSWERS), extra={"context_tokenizer": make_tokenizer(vocabulary, CONTEXT_LENGTH)},
        )

    def pretrain(self, config: TrainConfig, data: TrainData, out: Path, resuming: bool) -> None:
        """Trains the retriever (or reloads it from `retriever.keras` when resuming) and retrieves every
        example's contexts; builds the index of the index store."""
        options, extra = config.options, data.extra
        retriever_path = out / RETRIEVER_FILE
        start = time.perf_counter()
        if resuming and retriever_path.is_file():
            retriever = keras.saving.load_model(retriever_path)
        else:
            retriever = without_optimizer(train_retriever(
                data.train, data.tokenizer, len(data.vocabulary), preset=config.preset, encoder=config.encoder,
                learning_rate=config.learning_rate, batch_size=config.batch_size, epochs=options["retriever_epochs"],
                seed=config.seed, overrides=config.overrides,
            ))
            retriever.save(retriever_path)
        extra["retriever_seconds"] = time.perf_counter() - start
        names = product_index(retriever, data.tokenizer)
        extra["train_contexts"] = store_contexts(
            retriever, names, data.train, options["top_k"], extra["context_tokenizer"]
        )
        extra["held_out_ids"] = retrieve_products(retriever, names, data.held_out, options["top_k"])
        extra["held_out_contexts"] = catalogue.retrieved_contexts(
            data.held_out, extra["held_out_ids"], extra["context_tokenizer"]
        )
        extra["retriever"] = retriever
        extra["index"] = store_index(retriever, data.tokenizer, options["index_store"], out)

    def build_model(self, config: TrainConfig, data: TrainData, steps: int) -> keras.Model:
        keras.utils.set_random_seed(config.seed)
        reader = RetrievalReader.from_preset(
            config.preset, num_classes=len(data.answers), vocabulary_size=len(data.vocabulary),
            top_k=config.options["top_k"], context_length=CONTEXT_LENGTH, encoder=config.encoder, **config.overrides,
        )
        model = RetrievalAugmentedVLM.from_index(
            reader, data.extra["retriever"], data.extra["index"], data.extra["context_tokenizer"]
        )
        return self.compile(model, config, steps)

    def train_pass(self, config: TrainConfig, data: TrainData, seed: tf.Tensor) -> tf.data.Dataset:
        return make_context_dataset(
            data.train, data.extra["train_contexts"], data.tokenizer, data.answers, data.image_size,
            config.batch_size, shuffle=True, augment=config.augment, seed=seed,
        )

    def eval_dataset(self, config: TrainConfig, data: TrainData, examples: Sequence, batch_size: int) -> tf.data.Dataset:
        contexts = data.extra["held_out_contexts"][: len(examples)]
        return make_context_dataset(examples, contexts, data.tokenizer, data.answers, data.image_size, batch_size)

    def after_training(
        self, config: TrainConfig, data: TrainData, model: keras.Model, out: Path, distribution: Distribution
    ) -> dict[str, Any]:
        """Saves `index/`, drops `retriever.keras` and writes `rag.json` (`rag_report`)."""
        extra = data.extra
        extra["index"].save(out / INDEX_DIR)
        (out / RETRIEVER_FILE).unlink(missing_ok=True)
        eval_data = self.eval_dataset(config, data, data.held_out, self.eval_batch)
        # The saved model alone: in-graph retrieval from the index store's catalogue.
        store_examples = index_store_examples(config, image_size=data.image_size)
        store_data = make_dataset(store_examples, data.tokenizer, data.answers, data.image_size, 256)
        report = rag_report(
            config, data.held_out, _accuracy(model.predict(eval_data, verbose=0), data.held_out),
            retriever_recall(extra["held_out_ids"], data.held_out), extra["retriever_seconds"], store_examples,
            _accuracy(model.predict(store_data, verbose=0), store_examples),
        )
        (out / RAG_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return {"rag": report}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        metrics, out = summary["metrics"], Path(summary["output"])
        return [
            trained_line(
                summary, f"held-out loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f} (unseen stores)"
            ),
            format_rag(summary["rag"]),
            f"rag: {out / RAG_FILE}, index {out / INDEX_DIR}",
        ]

    def evaluation_examples(self, run: Run, size: int | None = None) -> list:
        """Fresh examples of the store whose catalogue is in the model's index (`index_store_examples`)."""
        return index_store_examples(run.config, size, run.model.backbone.image_size)

    def evaluate(self, run: Run, examples: Sequence, held_out: bool = True) -> dict[str, Any]:
        """The classifier report with `index_store` (None for examples from a folder)."""
        report = super().evaluate(run, examples, held_out)
        return report | {"index_store": run.config.options["index_store"] if held_out else None}

    def format_report(self, report: dict[str, Any]) -> str:
        text = super().format_report(report)
        if report.get("index_store") is None:
            return text
        return f"in-graph retrieval from the catalogue of store {report['index_store']} in the model's index\n{text}"

    def dual_encoder(self, run: Run) -> keras.Model:
        return run.model.retriever


TASK = RagTask


# -- another index in a trained model ---------------------------------------------------------


def attach_index(run_dir: str | Path, index_dir: str | Path, output: str | Path) -> dict[str, Any]:
    """Copies the rag run `run_dir` to `output` with the index at `index_dir` in its model.

    The new `model.keras` is `RetrievalAugmentedVLM.from_index(reader, retriever, index,
    context_tokenizer)` with the run's reader and retriever (any index size; entries tokenized
    to the reader's `context_length` with the run's vocabulary); `index/` holds the index and
    `run.json` records it (`index_dir`, and `index_store` when it is a store's catalogue, from
    `kvlm index build --catalogue`). Checkpoints, backups and logs are not copied.

    Returns `output`, `entries`, `index_store` and `index_dir`.

    Raises:
        ValueError: `run_dir` is not a rag run, `output` is not empty, or the index does not fit
            the retriever (another embedding dim or another dual encoder) or the reader (fewer
            entries than `top_k`).
    """
    run_dir, output = Path(run_dir), Path(output)
    run = load_run(run_dir)
    if run.config.task != INFO.name:
        raise ValueError(
            f"{run_dir} is a {run.config.task} run; `kvlm index attach` puts an index into a retrieval-augmented model: "
            "pass a `kvlm train --task rag` run folder as --model."
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output} already exists and is not an empty folder: choose a new run folder for --output.")
    index = KnowledgeIndex.load(index_dir)
    model = run.model
    retriever = model.retriever
    if index.embedding_dim != retriever.embedding_dim:
        raise ValueError(
            f"The index at {index_dir} has {index.embedding_dim}-d embeddings and the retriever of {run_dir} "
            f"{retriever.embedding_dim}-d: build the index with this run (`kvlm index build --model {run_dir}`)."
        )
    fingerprint = index.metadata.get("retriever")
    if fingerprint is not None and fingerprint != retriever_fingerprint(retriever):
        raise ValueError(
            f"The index at {index_dir} was embedded by another dual encoder ({index.metadata.get('model')}) than "
            f"the retriever of {run_dir}: build it with this run (`kvlm index build --model {run_dir}`)."
        )
    if len(index) < model.reader.top_k:
        raise ValueError(
            f"The index at {index_dir} has {len(index)} entries; the reader reads top_k={model.reader.top_k}."
        )
    context_tokenizer = make_tokenizer(read_vocabulary(run_dir), model.reader.context_length)
    attached = RetrievalAugmentedVLM.from_index(model.reader, retriever, index, context_tokenizer, query=model.query)

    store = index.metadata.get("catalogue")
    options = {
        **run.config.options, "index_store": None if store is None else int(store),
        "index_dir": str(Path(index_dir).resolve()),
    }
    config = replace(run.config, output=str(output), task_options=options)
    skip = (MODEL_FILE, CHECKPOINT_FILE, RETRIEVER_FILE, BACKUP_DIR, LOGS_DIR, INDEX_DIR, RUN_FILE)
    shutil.copytree(run_dir, output, ignore=shutil.ignore_patterns(*skip), dirs_exist_ok=True)
    attached.save(output / MODEL_FILE)
    index.save(output / INDEX_DIR)
    write_config(output, config)
    return {"output": str(output), "entries": len(index), "index_store": options["index_store"], "index_dir": options["index_dir"]}
