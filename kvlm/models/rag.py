"""Retrieval augmentation: knowledge-base entries fused into the answer model by cross-attention."""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
from keras import ops

from kvlm.layers.ops import top_k
from kvlm.models import encoders
from kvlm.models.backbone import VLMBackbone
from kvlm.models.composite import Composite
from kvlm.models.knowledge import QUERY_MODES, KnowledgeIndex
from kvlm.models.preprocessor import VLMPreprocessor, check_preprocessor


@keras.saving.register_keras_serializable(package="kvlm")
class RetrievalReader(Composite, keras.Model):
    """Image + question + retrieved entries -> answer logits.

    The backbone fuses the image and the question; `num_context_layers` keras-hub
    `TransformerDecoder` blocks (no causal mask) then let every fused token attend to the
    retrieved entries, encoded together by a `TextEncoder` over the `top_k * context_length`
    entry tokens (so an entry's rank is its position); the [CLS] token gives the logits.

    Inputs: `images` `(batch, S, S, 3)`, `token_ids` `(batch, sequence_length)` and
    `context_ids` `(batch, top_k, context_length)` (0 = padding; an all-padding context is
    allowed). Output: float32 `(batch, num_classes)` logits.

    Args:
        backbone: A `VLMBackbone`.
        num_classes: Number of answers.
        top_k: Entries read per example.
        context_length: Tokens per entry.
        num_context_layers: Cross-attention blocks.
        dropout: Dropout before the answer head.
    """

    PARTS = ("backbone",)
    OPTIONS = ("num_classes", "top_k", "context_length", "num_context_layers", "dropout")

    def __init__(
        self,
        backbone: VLMBackbone,
        num_classes: int,
        top_k: int = 3,
        context_length: int = 16,
        num_context_layers: int = 2,
        dropout: float = 0.0,
        **kwargs,
    ):
        for name, value, low in (
            ("num_classes", num_classes, 2), ("top_k", top_k, 1), ("context_length", context_length, 1),
            ("num_context_layers", num_context_layers, 1),
        ):
            if value < low:
                raise ValueError(f"`{name}` must be >= {low}. Received: {name}={value}")
        dtype = backbone.dtype_policy
        images, token_ids = backbone.input["images"], backbone.input["token_ids"]
        context_ids = keras.Input((top_k, context_length), dtype="int32", name="context_ids")
        features = backbone({"images": images, "token_ids": token_ids})
        x = features["sequence_output"]
        flat = keras.layers.Reshape((top_k * context_length,), name="flatten_context")(context_ids)
        context = encoders.text_encoder(
            backbone.vocabulary_size, {**backbone.sizes, "sequence_length": top_k * context_length}, dtype,
            name="context_encoder",
        )(flat)
        # The padding mask goes in explicitly; drop the one Keras attached, which the
        # attention's key / value projections would only warn about.
        context = ops.add(context, ops.zeros((), context.dtype))
        context_mask = ops.not_equal(flat, 0)
        for i in range(num_context_layers):
            x = keras_hub.layers.TransformerDecoder(
                backbone.intermediate_dim, backbone.num_heads, dropout=backbone.dropout, activation="gelu",
                layer_norm_epsilon=1e-6, normalize_first=True, dtype=dtype, name=f"context_block_{i}",
            )(
                x, context, decoder_padding_mask=features["padding_mask"], encoder_padding_mask=context_mask,
                use_causal_mask=False,
            )
        x = keras.layers.LayerNormalization(epsilon=1e-6, dtype=dtype, name="context_norm")(x)
        x = keras.layers.Dropout(dropout, name="head_dropout")(x[:, 0, :])
        logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
        super().__init__(
            inputs={"images": images, "token_ids": token_ids, "context_ids": context_ids}, outputs=logits, **kwargs
        )
        self.backbone = backbone
        self.num_classes = num_classes
        self.top_k = top_k
        self.context_length = context_length
        self.num_context_layers = num_context_layers
        self.dropout = dropout

    @classmethod
    def from_preset(
        cls, preset: str, num_classes: int, vocabulary_size: int, top_k: int = 3, context_length: int = 16,
        num_context_layers: int = 2, dropout: float = 0.0, **overrides,
    ) -> "RetrievalReader":
        """A reader on a preset backbone; `overrides` go to the backbone."""
        backbone = VLMBackbone.from_preset(preset, vocabulary_size=vocabulary_size, **overrides)
        return cls(backbone, num_classes, top_k, context_length, num_context_layers, dropout)


@keras.saving.register_keras_serializable(package="kvlm")
class RetrievalAugmentedVLM(Composite, keras.Model):
    """A `RetrievalReader` answering from the entries a `DualEncoder` retrieves from a built-in index.

    The index (`index_size` entries: unit key embeddings and entry token ids) is held in
    two non-trainable variables, so it is saved in the `.keras` file and carried by an
    exported SavedModel. `call({"images", "token_ids"})` embeds the query with the frozen
    retriever (`query`: the image, the question, or their normalised sum), scores every
    entry by cosine similarity, takes the `top_k` best (`keras.ops.top_k`) and gathers their
    token ids for the reader: one matrix product of `(batch, dim) x (dim, index_size)`, so
    query time grows linearly with the index.

    For training on contexts retrieved ahead of time (e.g. from a different knowledge base
    per example), pass `context_ids` too: retrieval is skipped and only the reader runs.

    Args:
        reader: The `RetrievalReader` (its `top_k` and `context_length` apply).
        retriever: A trained `kvlm.models.DualEncoder` sharing the reader's tokenizer, image
            size and sequence length; it is frozen.
        index_size: Number of index entries (>= `top_k`).
        query: One of `"image"`, `"text"`, `"image_text"`.
        preprocessor: Optional `VLMPreprocessor` (question tokenizer, image size, answers) saved
            with the model.

    Example:
        >>> model = RetrievalAugmentedVLM.from_index(reader, dual_encoder, index, context_tokenizer)
        >>> model.predict({"images": images, "token_ids": question_ids})
    """

    PARTS = ("reader", "retriever", "preprocessor")
    OPTIONS = ("index_size", "query")

    def __init__(
        self,
        reader: RetrievalReader,
        retriever: keras.Model,
        index_size: int,
        query: str = "image",
        preprocessor: VLMPreprocessor | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if query not in QUERY_MODES:
            raise ValueError(f"`query` must be one of {QUERY_MODES}. Received: query={query!r}")
        if index_size < reader.top_k:
            raise ValueError(
                f"The index must hold at least top_k={reader.top_k} entries. Received: index_size={index_size}"
            )
        backbone = reader.backbone
        for name in ("image_size", "sequence_length"):
            if getattr(retriever, name) != getattr(backbone, name):
                raise ValueError(
                    f"The retriever and the reader must share `{name}`: "
                    f"{getattr(retriever, name)} != {getattr(backbone, name)}."
                )
        check_preprocessor(preprocessor, backbone.image_size, backbone.sequence_length)
        self.reader = reader
        self.retriever = retriever
        self.preprocessor = preprocessor
        # Freeze every layer of the retriever. A model deserialized with trainable=False
        # has not passed the flag on to its layers, and the setter only does on a change.
        retriever.trainable = True
        retriever.trainable = False
        self.index_size = int(index_size)
        self.query = query
        self.index_embeddings = self.add_weight(
            shape=(self.index_size, retriever.embedding_dim), initializer="zeros", dtype="float32",
            trainable=False, name="index_embeddings",
        )
        self.index_token_ids = self.add_weight(
            shape=(self.index_size, reader.context_length), initializer="zeros", dtype="int32",
            trainable=False, name="index_token_ids",
        )
        self.built = True

    # -- the index ------------------------------------------------------------------------

    @classmethod
    def from_index(
        cls, reader: RetrievalReader, retriever: keras.Model, index: KnowledgeIndex, tokenizer, query: str = "image",
        preprocessor: VLMPreprocessor | None = None,
    ) -> "RetrievalAugmentedVLM":
        """A model sized for `index`, with its entries tokenized by `tokenizer` (see `set_index`)."""
        model = cls(reader, retriever, len(index), query=query, preprocessor=preprocessor)
        model.set_index(index, tokenizer)
        return model

    def set_index(self, index: KnowledgeIndex, tokenizer) -> None:
        """Loads `index` into the model: its embeddings, and its entries tokenized by `tokenizer`.

        `tokenizer` must produce `context_length` ids per entry (a `kvlm.data.make_tokenizer`
        of the reader's vocabulary with `sequence_length=context_length`). The index must have
        `index_size` entries; for another size use `from_index` with the same reader and retriever.
        """
        if len(index) != self.index_size:
            raise ValueError(
                f"The model holds {self.index_size} entries and the index has {len(index)}: "
                "build a model of the new size with RetrievalAugmentedVLM.from_index(reader, retriever, index, tokenizer)."
            )
        if index.embedding_dim != self.retriever.embedding_dim:
            raise ValueError(
                f"Index embeddings have dim {index.embedding_dim}, the retriever {self.retriever.embedding_dim}: "
                "build the index with this model's retriever."
            )
        self.index_token_ids.assign(self.context_token_ids(index.texts, tokenizer))
        self.index_embeddings.assign(index.embeddings)

    def context_token_ids(self, texts, tokenizer) -> np.ndarray:
        """`(len(texts), context_length)` int32 token ids of entry texts."""
        ids = np.asarray(keras.ops.convert_to_numpy(tokenizer(list(texts))), np.int32)
        if ids.ndim != 2 or ids.shape[1] != self.reader.context_length:
            raise ValueError(
                f"The tokenizer gives {ids.shape[1:]} ids per entry; the reader reads {self.reader.context_length}: "
                "use make_tokenizer(vocabulary, sequence_length=context_length)."
            )
        return ids

    # -- forward pass ---------------------------------------------------------------------

    def retrieve(self, images, token_ids):
        """`(scores, ids)` of the `top_k` best entries, each `(batch, top_k)`, best first."""
        embeddings = self.retriever({"images": images, "token_ids": token_ids}, training=False)
        if self.query == "image":
            query = embeddings["image_embedding"]
        elif self.query == "text":
            query = embeddings["text_embedding"]
        else:
            query = embeddings["image_embedding"] + embeddings["text_embedding"]
            query = query / ops.maximum(ops.norm(query, axis=-1, keepdims=True), 1e-12)
        scores = ops.matmul(ops.cast(query, "float32"), ops.transpose(self.index_embeddings))
        return top_k(scores, self.reader.top_k)

    def call(self, inputs, training=None):
        images, token_ids = inputs["images"], inputs["token_ids"]
        if "context_ids" in inputs:
            context_ids = inputs["context_ids"]
        else:
            _, ids = self.retrieve(images, token_ids)
            context_ids = ops.take(self.index_token_ids, ids, axis=0)
        return self.reader({"images": images, "token_ids": token_ids, "context_ids": context_ids}, training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape["images"][0], self.num_classes)

    # -- attributes the export and run tools read -----------------------------------------

    @property
    def backbone(self) -> VLMBackbone:
        return self.reader.backbone

    @property
    def num_classes(self) -> int:
        return self.reader.num_classes
