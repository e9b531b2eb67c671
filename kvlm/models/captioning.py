"""Captions as strings and their BLEU score (keras-hub's `Bleu` metric) for a `Captioner`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import tensorflow as tf


def caption_token_ranges(token_ids, start_token_id: int, end_token_id: int) -> tf.RaggedTensor:
    """The caption words of generated ids: the tokens after the start token and before the
    first end token, without padding, as a ragged int32 `(batch, None)` tensor (TensorFlow ops)."""
    token_ids = tf.cast(tf.convert_to_tensor(token_ids), tf.int32)
    is_end = tf.equal(token_ids, end_token_id)
    before_end = tf.equal(tf.cumsum(tf.cast(is_end, tf.int32), axis=1), 0)
    keep = before_end & tf.not_equal(token_ids, start_token_id) & tf.not_equal(token_ids, 0)
    return tf.ragged.boolean_mask(token_ids, keep)


def decode_captions(token_ids, tokenizer, start_token_id: int, end_token_id: int) -> tf.Tensor:
    """Generated ids `(batch, length)` to caption strings `[batch]` with the WordPiece detokenizer.

    Runs as TensorFlow (and tf-text) ops, so it works eagerly and inside a serving graph.
    """
    words = caption_token_ranges(token_ids, start_token_id, end_token_id)
    captions = tokenizer.detokenize(words)
    return tf.reshape(tf.convert_to_tensor(captions, tf.string), [-1])


def check_caption_tokens(model, tokenizer) -> None:
    """Raises unless the tokenizer's `[CLS]` / `[SEP]` ids are the captioner's start / end ids."""
    for token, expected in (("[CLS]", model.start_token_id), ("[SEP]", model.end_token_id)):
        actual = tokenizer.token_to_id(token)
        if actual != expected:
            raise ValueError(
                f"The tokenizer's {token} id ({actual}) differs from the captioner's ({expected}); "
                "build the captioner with the ids of its tokenizer."
            )


def generate_captions(
    model, images, tokenizer, sampler="greedy", max_length: int | None = None, batch_size: int = 128
) -> list[str]:
    """Caption strings for `images` (float `(n, S, S, 3)` in [0, 1]), `batch_size` at a time."""
    check_caption_tokens(model, tokenizer)
    images = np.asarray(images, dtype="float32")
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        ids = model.generate(images[start : start + batch_size], max_length=max_length, sampler=sampler)
        strings = decode_captions(ids, tokenizer, model.start_token_id, model.end_token_id).numpy()
        captions.extend(s.decode("utf-8") for s in strings)
    return captions


def bleu_score(references: Sequence[str], predictions: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU (keras-hub `Bleu`, sacreBLEU-style 13a tokenization) of one prediction per
    example against its reference caption."""
    import keras_hub

    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references for {len(predictions)} predictions.")
    if not references:
        raise ValueError("BLEU needs at least one caption.")
    metric = keras_hub.metrics.Bleu(max_order=max_order)
    metric.update_state([[r] for r in references], list(predictions))
    return float(np.asarray(metric.result()))


def most_frequent_caption(captions: Sequence[str]) -> str:
    """The most frequent caption (ties: the first in sorted order): a trivial baseline."""
    counts = Counter(captions)
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def images_of(examples, image_size: int) -> np.ndarray:
    """Float `(n, S, S, 3)` model inputs of in-memory examples, resized as in the input pipeline."""
    from kvlm.data.preprocessing import resize_image

    return np.stack([resize_image(tf.convert_to_tensor(e.image), image_size).numpy() for e in examples])


def caption_bleu(
    model,
    examples,
    tokenizer,
    sampler="greedy",
    max_length: int | None = None,
    batch_size: int = 128,
    return_captions: bool = False,
):
    """BLEU of `model`'s captions of `examples` (with in-memory images) against their captions.

    Returns the BLEU score, or `(bleu, generated_captions)` with `return_captions=True`.
    """
    images = images_of(examples, model.image_size)
    captions = generate_captions(model, images, tokenizer, sampler, max_length, batch_size)
    score = bleu_score([e.caption for e in examples], captions)
    return (score, captions) if return_captions else score
