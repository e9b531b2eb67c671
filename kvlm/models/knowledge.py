"""A knowledge base embedded by a `DualEncoder`: entries, their key embeddings, top-k search.

Each entry has a text (what a `RetrievalAugmentedVLM` reads) and a key that was embedded:
a text (embedded by the text tower; by default the entry text itself) or an image (embedded
by the image tower). Queries are image and/or text embeddings of the same dual encoder;
the score is the dot product of unit vectors (cosine similarity), searched exhaustively.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvlm.models.retrieval import embed_images, embed_texts

INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
QUERY_MODES = ("image", "text", "image_text")


@dataclass
class KnowledgeIndex:
    """Entry texts with their `(n, embedding_dim)` float32 unit key embeddings.

    Attributes:
        texts: The entries, in index order.
        embeddings: One unit row per entry.
        keys: What was embedded for each entry (a text, or `"<image>"`), for display.
        metadata: Saved with the index, e.g. the dual encoder's run folder.
    """

    texts: list[str]
    embeddings: np.ndarray
    keys: list[str]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.embeddings = np.asarray(self.embeddings, np.float32)
        if self.embeddings.ndim != 2:
            raise ValueError(f"`embeddings` must be 2-D (entries, dim). Received shape {self.embeddings.shape}")
        if not (len(self.texts) == len(self.keys) == len(self.embeddings)):
            raise ValueError(
                f"{len(self.texts)} texts, {len(self.keys)} keys and {len(self.embeddings)} embeddings: "
                "an index needs one of each per entry."
            )
        if not self.texts:
            raise ValueError("A knowledge index needs at least one entry.")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def embedding_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, ids)`, each `(num_queries, k)`, best first, of `(num_queries, dim)` queries."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.embedding_dim:
            raise ValueError(
                f"Queries must have shape (n, {self.embedding_dim}). Received shape {queries.shape}"
            )
        if not 1 <= k <= len(self):
            raise ValueError(f"`k` must be between 1 and the index size {len(self)}. Received: k={k}")
        scores = queries @ self.embeddings.T
        ids = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(scores, ids, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def save(self, directory: str | Path) -> Path:
        """Writes `index.json` (texts, keys) and `embeddings.npy` to `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / EMBEDDINGS_FILE, self.embeddings)
        meta = {
            "size": len(self), "embedding_dim": self.embedding_dim, "metadata": self.metadata,
            "texts": self.texts, "keys": self.keys,
        }
        (directory / INDEX_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "KnowledgeIndex":
        """Reads an index written by `save`."""
        directory = Path(directory)
        if not (directory / INDEX_FILE).exists():
            raise FileNotFoundError(f"No {INDEX_FILE} in {directory}: build an index there first (`kvlm index build`).")
        meta = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        return cls(
            texts=meta["texts"], embeddings=np.load(directory / EMBEDDINGS_FILE), keys=meta["keys"],
            metadata=meta.get("metadata", {}),
        )


def build_index(
    dual_encoder,
    tokenizer,
    texts: Sequence[str],
    keys: Sequence[str] | None = None,
    key_images=None,
    batch_size: int = 256,
) -> KnowledgeIndex:
    """Embeds a knowledge base with `dual_encoder` (a `kvlm.models.DualEncoder`).

    Args:
        dual_encoder: The trained dual encoder.
        tokenizer: Its tokenizer (fixed `sequence_length`).
        texts: The entries.
        keys: Texts to embed instead of the entries (e.g. product names); default: `texts`.
        key_images: `(n, S, S, 3)` images in [0, 1] to embed instead of texts.
        batch_size: Embedding batch size.
    """
    texts = [str(t) for t in texts]
    if keys is not None and key_images is not None:
        raise ValueError("Give `keys` (texts) or `key_images`, not both.")
    if key_images is not None:
        if len(key_images) != len(texts):
            raise ValueError(f"{len(key_images)} key images for {len(texts)} entries.")
        embeddings = embed_images(dual_encoder, key_images, batch_size)
        return KnowledgeIndex(texts, embeddings, ["<image>"] * len(texts))
    keys = texts if keys is None else [str(k) for k in keys]
    if len(keys) != len(texts):
        raise ValueError(f"{len(keys)} keys for {len(texts)} entries.")
    if not keys:
        raise ValueError("A knowledge index needs at least one entry.")
    embeddings = embed_texts(dual_encoder, np.asarray(tokenizer(keys)), batch_size)
    return KnowledgeIndex(texts, embeddings, keys)


def query_embeddings(dual_encoder, tokenizer=None, images=None, texts=None, batch_size: int = 256) -> np.ndarray:
    """Unit query vectors: image embeddings, text embeddings, or their normalised sum when both are given."""
    if images is None and texts is None:
        raise ValueError("A query needs images, texts or both.")
    parts = []
    if images is not None:
        parts.append(embed_images(dual_encoder, images, batch_size))
    if texts is not None:
        if tokenizer is None:
            raise ValueError("Text queries need the dual encoder's tokenizer.")
        parts.append(embed_texts(dual_encoder, np.asarray(tokenizer(list(texts))), batch_size))
    if len(parts) == 2 and len(parts[0]) != len(parts[1]):
        raise ValueError(f"{len(parts[0])} images and {len(parts[1])} texts: give one of each per query.")
    query = np.sum(parts, axis=0)
    return query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
