"""Router keys, fitted on an expert author's data, and the thresholds below which an expert abstains.

- Gaussian keys of a domain's features along the base path (`router_keys`, `base_routing_features`)
  and the log-likelihood threshold of an adapter expert's key (`abstention_threshold`).
- The question key of an adapter expert (`question_key`, `question_scores`,
  `question_threshold`): a smoothed unigram model of its author's questions over the expert's
  own vocabulary. The base's encoders read every word the base lacks as one unknown word, so
  only the question key can tell a legal question from a medical one.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kvlm.domain_experts.base import Base
from kvlm.layers.fusion import FusionBlock
from kvlm.layers.moe.keys import gaussian_key, key_logits, l2_normalize

# Examples router keys are computed on (their mean settles long before this).
KEY_EXAMPLES = 2048


def _parts(model: keras.Model):
    """`(image_encoder, text_encoder, modality_fusion, fusion blocks, final_norm)` of a base
    classifier, a specialist or a model with experts installed."""
    source = model.backbone if hasattr(model, "backbone") else model
    layers = {layer.name: layer for layer in source.layers}
    text_encoder = layers.get("grown_text_encoder") or layers["text_encoder"]
    blocks = [layer for layer in source.layers if isinstance(layer, FusionBlock)]
    return layers["image_encoder"], text_encoder, layers["modality_fusion"], blocks, layers["final_norm"]


def routing_features(model: keras.Model, inputs: dict) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """`(features, pooled, mask)` of one batch: each fusion block's feed-forward input
    `(batch, tokens, d)`, the pooled `(batch, d)` feature and the bool `(batch, tokens)` mask."""
    image_encoder, text_encoder, fusion, blocks, final_norm = _parts(model)
    token_ids = ops.convert_to_tensor(inputs["token_ids"], "int32")
    x, mask, modality = fusion(image_encoder(ops.convert_to_tensor(inputs["images"])), text_encoder(token_ids),
                               ops.not_equal(token_ids, 0))
    features = []
    for block in blocks:
        features.append(ops.convert_to_numpy(block.ffn_norm(block.attend(x, mask))))
        x = block(x, padding_mask=mask, modality=modality)
    pooled = ops.convert_to_numpy(final_norm(x)[:, 0, :])
    return features, pooled, ops.convert_to_numpy(mask).astype(bool)


def router_keys(model: keras.Model, dataset) -> np.ndarray:
    """`(fusion blocks + 1, d + 1, d)` Gaussian router keys of `model` (base or specialist) on
    `dataset`'s batches (`kvlm.layers.moe.keys.gaussian_key`).

    Key `i < blocks` is fitted on the sequences' routing features at fusion block `i`'s
    feed-forward input (the L2-normalized mean of a sequence's L2-normalized real tokens, as
    `SparseMoE(routing_scope="sequence")` computes them); the last on the L2-normalized
    pooled features the answer head routes on.
    """
    rows = None
    for batch in dataset:
        features, pooled, mask = routing_features(model, batch[0] if isinstance(batch, tuple) else batch)
        weights = mask.astype(np.float32)[..., None]
        means = [_unit((_unit(f) * weights).sum(axis=1)) for f in features] + [_unit(pooled)]
        rows = [[m] for m in means] if rows is None else [r + [m] for r, m in zip(rows, means)]
    if rows is None:
        raise ValueError("Router keys need at least one batch of data. Received: an empty dataset")
    return np.stack([gaussian_key(np.concatenate(r)) for r in rows])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# Share of the author's unseen examples an adapter expert's threshold lets fall to the base.
ABSTAIN_QUANTILE = 0.01
# Folds of the key's own examples scored by keys fitted without them (`abstention_threshold`).
THRESHOLD_FOLDS = 5


def base_token_ids(token_ids, base_vocabulary_size: int, unknown_id: int):
    """`token_ids` as the base's tokenizer sees them: words it lacks become its unknown id."""
    token_ids = ops.cast(token_ids, "int32")
    return ops.where(ops.greater_equal(token_ids, base_vocabulary_size), unknown_id, token_ids)


def routing_feature(backbone: keras.Model, images, token_ids):
    """`(batch, 2 d)` routing feature on a base backbone's encoders: the mean direction of its
    image encoder's tokens and that of its text encoder's real tokens (`token_ids` in the base's
    vocabulary), side by side. The image and the question each have to fit an expert's key."""
    image = l2_normalize(ops.mean(l2_normalize(backbone.get_layer("image_encoder")(images)), axis=1))
    real = ops.expand_dims(ops.cast(ops.not_equal(token_ids, 0), "float32"), -1)
    text = l2_normalize(ops.sum(l2_normalize(backbone.get_layer("text_encoder")(token_ids)) * real, axis=1))
    return ops.concatenate([image, text], axis=-1)


def base_routing_features(base: Base, dataset) -> np.ndarray:
    """`(examples, 2 d)` routing features (`routing_feature`) of `dataset`'s batches
    on the base's encoders, words the base lacks read as its unknown id."""
    features = []
    for batch in dataset:
        inputs = batch[0] if isinstance(batch, tuple) else batch
        token_ids = base_token_ids(inputs["token_ids"], len(base.vocabulary), base.unknown_id)
        images = ops.convert_to_tensor(inputs["images"])
        features.append(ops.convert_to_numpy(routing_feature(base.model.backbone, images, token_ids)))
    if not features:
        raise ValueError("Router keys need at least one batch of data. Received: an empty dataset")
    return np.concatenate(features)


def abstention_threshold(
    key_features: np.ndarray, held_out_features: np.ndarray | None = None, quantile: float = ABSTAIN_QUANTILE,
    folds: int = THRESHOLD_FOLDS, seed: int = 0,
) -> float:
    """The log-likelihood under `gaussian_key(key_features)` that all but `quantile` of the
    author's unseen examples reach (`cross_fitted_quantile`)."""
    return cross_fitted_quantile(key_features, gaussian_key, _logits, held_out_features, quantile, folds, seed)


def cross_fitted_quantile(
    examples: np.ndarray, fit, score, held_out: np.ndarray | None = None, quantile: float = ABSTAIN_QUANTILE,
    folds: int = THRESHOLD_FOLDS, seed: int = 0,
) -> float:
    """The `quantile` of the scores of the author's examples, each scored by a key that never saw it.

    A key scores the examples it was fitted on too well, and a held-out split alone is too
    small for a 1% quantile, so the quantile is taken over every example the author has: the
    `held_out` examples (if any) under `fit(examples)` (the key the expert routes with), and
    each of `folds` folds of `examples` under the key fitted on the other folds.

    Args:
        examples: What the key is fitted on, one example per row.
        fit: `examples -> key`.
        score: `(examples, key) -> (examples,)` scores, higher for a better fit.
        held_out: Examples the key was not fitted on.
    """
    if len(examples) < 2 * folds:
        raise ValueError(f"An abstention threshold needs at least {2 * folds} key examples. "
                         f"Received: {len(examples)}")
    scores = [] if held_out is None else [score(held_out, fit(examples))]
    order = np.random.default_rng(seed).permutation(len(examples))
    for fold in np.array_split(order, folds):
        scores.append(score(examples[fold], fit(np.delete(examples, fold, axis=0))))
    return float(np.quantile(np.concatenate(scores), quantile))


# The threshold of a gate that admits every input.
OPEN_GATE = float(np.finfo(np.float32).min)


def marginal_key(key: np.ndarray, dims: int) -> np.ndarray:
    """The Gaussian key (`gaussian_key`'s layout) of the first `dims` features under `key`: the
    same as `gaussian_key` of those features alone, since a marginal's covariance is a block of
    the joint's."""
    key = np.asarray(key, np.float64)
    factor = key[1:]
    covariance = np.linalg.inv(factor @ factor.T)[:dims, :dims]
    return np.concatenate([key[:1, :dims], np.linalg.cholesky(np.linalg.inv(covariance))]).astype(np.float32)


# Count added to every word of an expert's vocabulary in its question key (add-one smoothing).
QUESTION_SMOOTHING = 1.0


def question_key(token_ids: np.ndarray, vocabulary_size: int, smoothing: float = QUESTION_SMOOTHING) -> np.ndarray:
    """Float32 `(vocabulary_size,)` log-probabilities of a smoothed unigram model of the
    questions' tokens (`token_ids`, `(questions, sequence)`, 0 for padding)."""
    token_ids = np.asarray(token_ids)
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocabulary_size):
        raise ValueError(f"Token ids must lie in [0, {vocabulary_size}). Received: ids from {token_ids.min()} "
                         f"to {token_ids.max()}")
    counts = np.bincount(token_ids[token_ids != 0].ravel(), minlength=vocabulary_size).astype(np.float64) + smoothing
    counts[0] = smoothing  # padding is never scored
    return np.log(counts / counts.sum()).astype(np.float32)


def question_scores(token_ids, log_probs):
    """`(batch,)` mean log-probability of each question's real tokens (`token_ids`, 0 for
    padding) under a question key's `log_probs`; 0 for an empty question. Columns of a 2-D
    `(words, experts)` `log_probs` score under each expert's key: `(batch, experts)`."""
    token_ids = ops.cast(token_ids, "int32")
    real = ops.cast(ops.not_equal(token_ids, 0), "float32")
    per_token = ops.take(ops.cast(log_probs, "float32"), token_ids, axis=0)
    if len(per_token.shape) == 3:
        real = ops.expand_dims(real, -1)
    return ops.sum(per_token * real, axis=1) / ops.maximum(ops.sum(real, axis=1), 1.0)


def question_threshold(
    token_ids: np.ndarray, vocabulary_size: int, held_out_token_ids: np.ndarray | None = None,
    quantile: float = ABSTAIN_QUANTILE,
) -> float:
    """The question score (`question_scores`) that all but `quantile` of the author's unseen
    questions reach (`cross_fitted_quantile`)."""
    return cross_fitted_quantile(
        np.asarray(token_ids), lambda ids: question_key(ids, vocabulary_size),
        lambda ids, key: ops.convert_to_numpy(question_scores(ids, key)), held_out_token_ids, quantile,
    )


def _logits(features: np.ndarray, key: np.ndarray) -> np.ndarray:
    return ops.convert_to_numpy(key_logits(ops.convert_to_tensor(features), key[None]))[:, 0]


def adapter_routing(base: Base, key_data, held_out_data, questions: np.ndarray, held_out_questions: np.ndarray,
                    vocabulary_size: int) -> dict:
    """What an adapter expert routes with, fitted on its author's data alone (`DomainExpert`'s
    `keys`, `threshold`, `image_threshold`, `question_key` and `question_threshold`). Each of its
    three gates turns away `ABSTAIN_QUANTILE / 3` of the author's unseen examples, so all
    three together at most `ABSTAIN_QUANTILE`.

    Args:
        base: The frozen base.
        key_data, held_out_data: Batches of the author's training (key) and held-out examples.
        questions, held_out_questions: Their questions' token ids in the expert's tokenizer.
        vocabulary_size: The expert's tokenizer's vocabulary size.
    """
    features, held_out = base_routing_features(base, key_data), base_routing_features(base, held_out_data)
    image = features.shape[1] // 2  # the image half of the routing feature
    quantile = ABSTAIN_QUANTILE / 3  # three gates, so that at most ABSTAIN_QUANTILE falls to the base
    return {
        "keys": gaussian_key(features)[None],
        "threshold": abstention_threshold(features, held_out, quantile),
        "image_threshold": abstention_threshold(features[:, :image], held_out[:, :image], quantile),
        "question_key": question_key(questions, vocabulary_size),
        "question_threshold": question_threshold(questions, vocabulary_size, held_out_questions, quantile),
    }
