"""NumPy references shared by the router and SparseMoE tests."""

import numpy as np
from keras import ops


def to_numpy(x) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
