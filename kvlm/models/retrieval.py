"""Image <-> text retrieval with a `DualEncoder`: embeddings and recall@k (numpy).

Positives: an image and a text match when their captions are identical, not only
when they come from the same example. Procedural datasets repeat captions (the shapes
dataset has about two thousand distinct captions, and one-object captions recur
often), so retrieving any image or text with the same caption counts as correct.
Pass `captions=None` to count only the paired item as correct.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
DIRECTIONS = ("image_to_text", "text_to_image")


def embed_images(model, images, batch_size: int = 256) -> np.ndarray:
    """`(n, embedding_dim)` float32 image embeddings of `(n, S, S, 3)` images in [0, 1]."""
    images = np.asarray(images, dtype=np.float32)
    return np.asarray(model.image_model().predict(images, batch_size=batch_size, verbose=0), np.float32)


def embed_texts(model, token_ids, batch_size: int = 256) -> np.ndarray:
    """`(n, embedding_dim)` float32 text embeddings of `(n, sequence_length)` token ids."""
    token_ids = np.asarray(token_ids, dtype=np.int32)
    return np.asarray(model.text_model().predict(token_ids, batch_size=batch_size, verbose=0), np.float32)


def embed_pairs(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of every pair in a `({"images", "token_ids"}, ...)` dataset."""
    outputs = model.predict(dataset, verbose=0)
    return (
        np.asarray(outputs["image_embedding"], np.float32),
        np.asarray(outputs["text_embedding"], np.float32),
    )


def _labels(captions: Sequence[Hashable] | None, n: int) -> np.ndarray:
    if captions is None:
        return np.arange(n)
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} pairs.")
    _, labels = np.unique(np.asarray(list(captions), dtype=object).astype(str), return_inverse=True)
    return labels.reshape(-1)


def _check_ks(ks: Sequence[int], n: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"Every k must be >= 1. Received: ks={ks}")
    if n < 1:
        raise ValueError("No pairs to retrieve from.")
    return ks


def recall_at_k(
    image_embeddings,
    text_embeddings,
    ks: Sequence[int] = DEFAULT_KS,
    captions: Sequence[Hashable] | None = None,
) -> dict[str, dict[str, float]]:
    """Recall@k in both directions over `n` image-text pairs.

    Pair `i` is image `i` with text `i`. Every image is a query over all `n` texts
    (`image_to_text`) and every text over all `n` images (`text_to_image`), ranked by
    dot product (cosine similarity for unit embeddings). A query scores a hit at `k`
    when one of its `k` best-ranked items is a positive: an item whose caption equals
    the query's (`captions[j] == captions[i]`); with `captions=None`, only item `i`.
    Equal scores keep the items' order.

    Returns:
        `{"image_to_text": {"recall@1": r, ...}, "text_to_image": {...}}` with `r` in [0, 1].
    """
    image_embeddings = np.asarray(image_embeddings, dtype=np.float64)
    text_embeddings = np.asarray(text_embeddings, dtype=np.float64)
    if image_embeddings.ndim != 2 or image_embeddings.shape != text_embeddings.shape:
        raise ValueError(
            "Expected image and text embeddings of the same (n, dim) shape. Received: "
            f"{image_embeddings.shape} and {text_embeddings.shape}"
        )
    n = image_embeddings.shape[0]
    ks = _check_ks(ks, n)
    labels = _labels(captions, n)
    positives = labels[:, None] == labels[None, :]
    scores = image_embeddings @ text_embeddings.T
    result = {}
    for direction, matrix, mask in (
        ("image_to_text", scores, positives),
        ("text_to_image", scores.T, positives.T),
    ):
        order = np.argsort(-matrix, axis=1, kind="stable")
        ranked_hits = np.take_along_axis(mask, order, axis=1)
        first_hit = np.argmax(ranked_hits, axis=1)  # every query has a positive (itself)
        result[direction] = {f"recall@{k}": float(np.mean(first_hit < k)) for k in ks}
    return result


def chance_recall_at_k(
    captions: Sequence[Hashable] | int, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Expected recall@k of a random ranking, in either direction.

    A query whose caption appears `m` times among the `n` pairs hits at `k` with
    probability `1 - C(n - m, k) / C(n, k)`; this averages that over the queries. An
    int `n` means `n` pairs with distinct captions (chance `k / n`). Both directions
    have the same chance because every pair holds one image and one text.
    """
    labels = np.arange(captions) if isinstance(captions, int) else _labels(captions, len(captions))
    n = len(labels)
    ks = _check_ks(ks, n)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    m = counts[inverse.reshape(-1)].astype(np.float64)
    chance = {}
    for k in ks:
        miss = np.ones(n)
        for t in range(min(k, n)):
            miss *= np.clip((n - m - t) / (n - t), 0.0, None)
        chance[f"recall@{k}"] = float(np.mean(1.0 - miss))
    return chance
