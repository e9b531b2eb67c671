"""The tf.data input pipelines (question-answer and image-caption pairs): decode, resize,
augment, tokenize, batch, prefetch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from kvlm.data.example import Example
from kvlm.data.preprocessing import decode_image, make_augmenter, resize_image


def answer_vocabulary(examples: Sequence[Example]) -> list[str]:
    """Sorted distinct answers: the classifier's label set."""
    return sorted({e.answer for e in examples})


def encode_answers(examples: Sequence[Example], answers: Sequence[str]) -> np.ndarray:
    """Maps each example's answer to its index in `answers`."""
    index = {a: i for i, a in enumerate(answers)}
    unknown = sorted({e.answer for e in examples} - set(index))
    if unknown:
        raise ValueError(f"Answers not in the label set: {unknown[:10]}. Label set: {list(answers)[:20]}")
    return np.array([index[e.answer] for e in examples], dtype=np.int32)


def _source(examples: Sequence[Example]) -> tf.data.Dataset:
    """A dataset of uint8 images (any size) paired with the example index."""
    indices = np.arange(len(examples), dtype=np.int64)
    if all(e.image is not None for e in examples):
        shapes = {e.image.shape for e in examples}
        if len(shapes) == 1:
            images = np.stack([e.image for e in examples]).astype(np.uint8)
            return tf.data.Dataset.from_tensor_slices((images, indices))

        def generate():
            for i, e in enumerate(examples):
                yield e.image.astype(np.uint8), i

        return tf.data.Dataset.from_generator(
            generate,
            output_signature=(
                tf.TensorSpec((None, None, 3), tf.uint8),
                tf.TensorSpec((), tf.int64),
            ),
        )
    if all(e.image_path is not None for e in examples):
        paths = [e.image_path for e in examples]
        return tf.data.Dataset.from_tensor_slices((paths, indices)).map(
            lambda path, i: (decode_image(tf.io.read_file(path)), i),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    raise ValueError("Every example needs an in-memory `image`, or every example an `image_path`.")


def _image_text_batches(
    examples: Sequence[Example],
    texts: Sequence[str],
    targets: np.ndarray | None,
    to_batch,
    image_size: int,
    batch_size: int,
    shuffle: bool,
    augment: bool,
    seed: int,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """The shared pipeline: decode, (shuffle), (augment), resize, batch, then `to_batch`.

    `to_batch(images, texts)` or, with `targets`, `to_batch(images, texts, targets)` maps a
    batch of resized images and raw strings (and per-example targets) to model inputs.
    """
    if not examples:
        raise ValueError("`examples` is empty.")
    text_table = tf.constant(list(texts))
    target_table = None if targets is None else tf.constant(targets)
    dataset = _source(examples)
    if shuffle:
        dataset = dataset.shuffle(min(len(examples), 50_000), seed=seed, reshuffle_each_iteration=True)
    augmenter = make_augmenter() if augment else None

    def to_features(image, index):
        if augmenter is not None:
            image = augmenter(image)
        features = (resize_image(image, image_size), tf.gather(text_table, index))
        return features if target_table is None else (*features, tf.gather(target_table, index))

    dataset = dataset.map(to_features, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_dataset(
    examples: Sequence[Example],
    tokenizer,
    answers: Sequence[str],
    image_size: int,
    batch_size: int = 64,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """Builds `({"images", "token_ids"}, label)` batches from examples.

    Args:
        examples: Records with in-memory images or image paths.
        tokenizer: A keras-hub tokenizer with a fixed `sequence_length`.
        answers: The label set; each example's answer must be in it.
        image_size: Side of the square model input.
        batch_size: Examples per batch.
        shuffle: Reshuffle every epoch (deterministic from `seed`).
        augment: Apply tf-models-official RandAugment with answer-preserving operations.
        seed: Shuffle seed.
    """
    labels = encode_answers(examples, answers) if examples else None
    return _image_text_batches(
        examples, [e.question for e in examples], labels,
        lambda images, text, label: ({"images": images, "token_ids": tokenizer(text)}, label),
        image_size, batch_size, shuffle, augment, seed,
    )


def caption_ids(examples: Sequence[Example], captions: Sequence[str] | None = None) -> np.ndarray:
    """Each example's caption as an int32 id: its index in `captions` (default: the sorted
    distinct captions of `examples`).

    Two examples share an id exactly when their captions are identical strings; contrastive
    training and retrieval treat such image-caption pairs as positives of each other.
    """
    if captions is None:
        captions = sorted({e.caption for e in examples})
    index = {c: i for i, c in enumerate(captions)}
    unknown = sorted({e.caption for e in examples} - set(index))
    if unknown:
        raise ValueError(f"Captions not in the caption list: {unknown[:5]}")
    return np.array([index[e.caption] for e in examples], dtype=np.int32)


def make_pair_dataset(
    examples: Sequence[Example],
    tokenizer,
    image_size: int,
    batch_size: int = 64,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Builds `({"images", "token_ids"}, caption_id)` batches of image-caption pairs.

    `token_ids` are the tokenized `Example.caption`; `caption_id` (int32, see `caption_ids`)
    is equal for examples with identical captions, which a `kvlm.models.DualEncoder` uses
    as pair ids so that images with the same caption are positives, not negatives.
    Images go through the same decode / augment / resize steps as `make_dataset`.

    Args:
        examples: Records with in-memory images or image paths.
        tokenizer: A keras-hub tokenizer with a fixed `sequence_length`.
        image_size: Side of the square model input.
        batch_size: Pairs per batch (the in-batch negatives of a contrastive loss).
        shuffle: Reshuffle every epoch (deterministic from `seed`).
        augment: Apply tf-models-official RandAugment with answer-preserving operations.
        seed: Shuffle seed.
        drop_remainder: Drop the last partial batch.
    """
    ids = caption_ids(examples) if examples else None
    return _image_text_batches(
        examples, [e.caption for e in examples], ids,
        lambda images, text, pair_id: ({"images": images, "token_ids": tokenizer(text)}, pair_id),
        image_size, batch_size, shuffle, augment, seed, drop_remainder,
    )


CAPTION_START_TOKEN = "[CLS]"
CAPTION_END_TOKEN = "[SEP]"


def pack_captions(tokenizer, texts, sequence_length: int | None = None) -> tf.Tensor:
    """Tokenizes `texts` to int32 `[CLS] words [SEP]` rows of `sequence_length`, padded with 0.

    `sequence_length` defaults to the tokenizer's; longer captions are cut, keeping `[SEP]`.
    The tokenizer's own `sequence_length` must leave room for the longest caption (it cuts first).
    """
    import keras_hub

    sequence_length = sequence_length or tokenizer.sequence_length
    if not sequence_length or sequence_length < 3:
        raise ValueError(f"`sequence_length` must be >= 3. Received: sequence_length={sequence_length}")
    start, end = tokenizer.token_to_id(CAPTION_START_TOKEN), tokenizer.token_to_id(CAPTION_END_TOKEN)
    ids = tf.cast(tokenizer(texts), tf.int32)
    if not isinstance(ids, tf.RaggedTensor):
        ids = tf.RaggedTensor.from_tensor(ids, padding=0)
    packer = keras_hub.layers.StartEndPacker(
        sequence_length, start_value=start, end_value=end, pad_value=0, dtype="int32"
    )
    return tf.cast(packer(ids), tf.int32)


def make_caption_dataset(
    examples: Sequence[Example],
    tokenizer,
    image_size: int,
    batch_size: int = 64,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
    sequence_length: int | None = None,
) -> tf.data.Dataset:
    """Builds `({"images", "token_ids"}, next_token_ids)` batches for teacher-forced captioning.

    `token_ids` are `[CLS] caption [SEP]` padded with 0 (`pack_captions`); `next_token_ids`
    are the same shifted left by one (the token each position predicts), padded with 0.
    Images go through the same decode / augment / resize steps as `make_dataset`.

    Args:
        examples: Records with in-memory images or image paths, and a `caption`.
        tokenizer: A keras-hub WordPiece tokenizer whose vocabulary has `[CLS]` and `[SEP]`.
        image_size: Side of the square model input.
        batch_size: Examples per batch.
        shuffle: Reshuffle every epoch (deterministic from `seed`).
        augment: Apply tf-models-official RandAugment with answer-preserving operations.
        seed: Shuffle seed.
        drop_remainder: Drop the last partial batch.
        sequence_length: Length of `token_ids` (default: the tokenizer's).
    """
    def to_batch(images, text):
        token_ids = pack_captions(tokenizer, text, sequence_length)
        targets = tf.pad(token_ids[:, 1:], [[0, 0], [0, 1]])
        return {"images": images, "token_ids": token_ids}, targets

    return _image_text_batches(
        examples, [e.caption for e in examples], None, to_batch,
        image_size, batch_size, shuffle, augment, seed, drop_remainder,
    )


def make_context_dataset(
    examples: Sequence[Example],
    contexts,
    tokenizer,
    answers: Sequence[str],
    image_size: int,
    batch_size: int = 64,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """Builds `({"images", "token_ids", "context_ids"}, label)` batches for a retrieval-augmented model.

    As `make_dataset`, plus each example's retrieved knowledge-base entries: `contexts` is an
    int `(len(examples), top_k, context_length)` array of entry token ids (0 = padding),
    e.g. the entries a `kvlm.models.KnowledgeIndex` returned for the example.
    """
    contexts = np.asarray(contexts)
    if contexts.ndim != 3 or len(contexts) != len(examples):
        raise ValueError(
            f"`contexts` must have shape ({len(examples)}, top_k, context_length). Received shape {contexts.shape}"
        )
    top_k, length = contexts.shape[1:]
    labels = encode_answers(examples, answers) if examples else None
    # The label and the flattened contexts travel as one int32 row per example.
    targets = None if labels is None else np.concatenate(
        [labels.reshape(-1, 1).astype(np.int32), contexts.reshape(len(examples), -1).astype(np.int32)], axis=1
    )

    def to_batch(images, text, target):
        context_ids = tf.reshape(target[:, 1:], (-1, top_k, length))
        return {"images": images, "token_ids": tokenizer(text), "context_ids": context_ids}, target[:, 0]

    return _image_text_batches(
        examples, [e.question for e in examples], targets, to_batch, image_size, batch_size, shuffle, augment, seed,
    )
