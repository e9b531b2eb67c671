"""Router keys: Gaussians of a domain's features along the base path, fitted on its author's data,
and the abstention threshold of an adapter expert's key."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kvlm.domain_experts.base import Base
from kvlm.layers.fusion import FusionBlock
from kvlm.layers.moe.keys import gaussian_key, key_logits

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


def base_routing_features(base: Base, dataset) -> np.ndarray:
    """`(examples, 2 d)` routing features (`multi_adapter.routing_feature`) of `dataset`'s batches
    on the base's encoders, words the base lacks read as its unknown id."""
    from kvlm.domain_experts.multi_adapter import base_token_ids, routing_feature

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
    """The log-likelihood that all but `quantile` of the author's unseen examples reach.

    A key scores the examples it was fitted on too well, and a held-out split alone is too
    small for a 1% quantile, so the quantile is taken over every example the author has, each
    scored by a key that never saw it: the held-out features (if any) under the key of all
    `key_features` (what `gaussian_key(key_features)` routes with), and each of `folds` folds
    of `key_features` under the key fitted on the other folds.
    """
    if len(key_features) < 2 * folds:
        raise ValueError(f"An abstention threshold needs at least {2 * folds} key examples. "
                         f"Received: {len(key_features)}")
    logits = [] if held_out_features is None else [_logits(held_out_features, gaussian_key(key_features))]
    order = np.random.default_rng(seed).permutation(len(key_features))
    for fold in np.array_split(order, folds):
        logits.append(_logits(key_features[fold], gaussian_key(np.delete(key_features, fold, axis=0))))
    return float(np.quantile(np.concatenate(logits), quantile))


def _logits(features: np.ndarray, key: np.ndarray) -> np.ndarray:
    return ops.convert_to_numpy(key_logits(ops.convert_to_tensor(features), key[None]))[:, 0]
