"""Router keys: fixed per-expert keys that route with no trained router.

Two kinds, told apart by their shape:

- cosine keys `(experts, d)`: the logit of a feature is its cosine similarity to each
  expert's key (e.g. the expert's mean L2-normalized feature);
- Gaussian keys `(experts, d + 1, d)`: per expert, row 0 is the mean `mu` of its features
  and rows `1..d` a lower-triangular factor `L` of their precision (`P = L L^T`, a
  Cholesky factor); the logit is the Gaussian log-likelihood up to a shared constant,
  `-|L^T (f - mu)|^2 / 2 + log det L`. Each expert's author fits its Gaussian on their own
  data (`gaussian_key`), so experts trained apart are told apart by the shape of their
  feature distributions, not only by their means.

Features are L2-normalized before scoring with either kind.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from keras import ops

# Ridge added to a fitted covariance of unit-norm features (per-dimension variance ~ 1 / d).
GAUSSIAN_RIDGE = 1e-3


def validate_keys(keys, num_experts: int, expert_names: Sequence[str], argument: str = "router_keys") -> np.ndarray:
    """`keys` as float32 cosine `(num_experts, d)` or Gaussian `(num_experts, d + 1, d)` keys, as given.

    Raises:
        ValueError: Not an array of that shape, not finite, a zero cosine key, or a Gaussian
            factor that is not lower-triangular with a non-zero diagonal (naming the experts).
    """
    try:
        keys = np.array(keys, dtype="float32")
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{argument}` must be an array of floats. Received: {argument}={keys!r}") from error
    gaussian = keys.ndim == 3 and keys.shape[1] == keys.shape[2] + 1
    if keys.ndim not in (2, 3) or keys.shape[0] != num_experts or keys.shape[-1] < 1 or (keys.ndim == 3 and not gaussian):
        raise ValueError(
            f"`{argument}` must have shape (num_experts={num_experts}, d) or (num_experts={num_experts}, d + 1, d). "
            f"Received: {argument}.shape={keys.shape}"
        )
    if not np.all(np.isfinite(keys)):
        raise ValueError(f"`{argument}` must be finite. Received: {argument} with NaN or inf values")
    if gaussian:
        bad = [i for i, f in enumerate(keys[:, 1:, :]) if np.any(np.triu(f, 1)) or not np.all(np.diag(f))]
        need, received = "a lower-triangular precision factor with a non-zero diagonal", "invalid precision factors"
    else:
        bad = list(np.flatnonzero(~np.any(keys != 0, axis=1)))
        need, received = "a non-zero key", f"zero {argument}"
    if bad:
        raise ValueError(
            f"`{argument}` must have {need} per expert. Received: {received} for experts "
            f"{[expert_names[i] for i in bad]}"
        )
    return keys


def is_gaussian(keys) -> bool:
    """Whether `keys` are Gaussian keys (rank 3)."""
    return len(keys.shape) == 3


def stored_keys(keys: np.ndarray) -> np.ndarray:
    """The keys as a layer stores them: cosine keys L2-normalized, Gaussian keys as given."""
    if is_gaussian(keys):
        return keys.astype("float32")
    keys = keys.astype("float64")
    return (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype("float32")


def l2_normalize(x, axis: int = -1):
    """`x` (as float32) scaled to unit L2 norm along `axis`; zero vectors stay zero."""
    x = ops.cast(x, "float32")
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True)), 1e-12)


def key_logits(features, keys):
    """`(n, experts)` logits of `(n, d)` L2-normalized features against stored `keys`."""
    keys = ops.cast(keys, "float32")
    if not is_gaussian(keys):
        return ops.matmul(features, ops.transpose(keys))
    means, factors = keys[:, 0, :], keys[:, 1:, :]
    z = ops.einsum("ned,edk->nek", ops.expand_dims(features, 1) - ops.expand_dims(means, 0), factors)
    log_det = ops.sum(ops.log(ops.abs(ops.diagonal(factors, axis1=-2, axis2=-1))), axis=-1)
    return -0.5 * ops.sum(ops.square(z), axis=-1) + log_det


def gaussian_key(features: np.ndarray, ridge: float = GAUSSIAN_RIDGE) -> np.ndarray:
    """The `(d + 1, d)` Gaussian key of `(n, d)` L2-normalized features: their mean, then the
    Cholesky factor of the inverse of their covariance plus `ridge`."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"A Gaussian key needs (n >= 2, d) features. Received: shape {features.shape}")
    mean = features.mean(axis=0)
    covariance = np.cov(features, rowvar=False) + ridge * np.eye(features.shape[1])
    factor = np.linalg.cholesky(np.linalg.inv(covariance))
    return np.concatenate([mean[None], factor]).astype("float32")
