"""Low-rank adapters through a base backbone, with Keras's own LoRA.

- Which layers take an adapter (`adaptable_indices`): the backbone's `Dense`, `EinsumDense`
  and `Conv2D` layers, numbered as keras-hub numbers them (`Backbone.save_lora_weights`: the
  index among the layers that own weights).
- How an expert trains them (`enable_adapters`: Keras `enable_lora` with every other weight
  frozen) and keeps them (`lora_pair`, `save_adapters` / `load_adapters` in keras-hub's
  `.lora.h5` layout).
- How many experts' adapters run on one frozen base (`per_example_delta`): each example
  through its own expert's pair, gathered per example, so a batch costs the same whatever
  the number of experts installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
from keras import ops

ADAPTABLE = (keras.layers.EinsumDense, keras.layers.Dense, keras.layers.Conv2D)
# The letter a batched einsum equation gives the adapter rank.
_RANK_LETTER = "z"


def weighted_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers that own weights, in keras-hub's LoRA order."""
    return [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]


def check_adaptable(layer: keras.layers.Layer) -> None:
    """Raises unless `layer` can carry a per-example adapter."""
    if not isinstance(layer, ADAPTABLE):
        raise ValueError(f"Only Dense, EinsumDense and Conv2D layers take adapters. Received: {layer.name!r} "
                         f"({type(layer).__name__})")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"Adapters need an unquantized layer. Received: {layer.name!r} quantized "
                         f"({layer.quantization_mode})")
    if isinstance(layer, keras.layers.EinsumDense):
        batched_equation(layer.equation)
    if isinstance(layer, keras.layers.Conv2D) and (layer.data_format != "channels_last" or layer.groups != 1):
        raise ValueError(f"Conv2D adapters need channels_last data and groups=1. Received: {layer.name!r}")


def adaptable_indices(backbone: keras.Model, targets: Sequence[str] | None = None) -> list[int]:
    """Indices (in `weighted_layers`) of the adaptable layers whose path contains one of
    `targets` (e.g. `"image_encoder"`, `"attention"`); all of them when `targets` is None.

    Raises:
        ValueError: No adaptable layer matches `targets`.
    """
    found = []
    for index, layer in enumerate(weighted_layers(backbone)):
        if not isinstance(layer, ADAPTABLE) or (targets is not None and not any(t in layer.path for t in targets)):
            continue
        check_adaptable(layer)
        found.append(index)
    if not found:
        raise ValueError(f"No Dense, EinsumDense or Conv2D layer of the backbone matches the targets. "
                         f"Received: targets={list(targets or [])}")
    return found


def enable_adapters(backbone: keras.Model, rank: int, indices: Sequence[int]) -> None:
    """Freezes every weight of `backbone` and gives the layers at `indices` trainable rank-`rank`
    LoRA adapters (Keras `enable_lora`; their product starts at zero)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be an int >= 1. Received: rank={rank!r}")
    layers = weighted_layers(backbone)
    for layer in layers:
        for variable in layer._trainable_variables:
            variable.trainable = False
    for index in indices:
        layers[index].enable_lora(rank)


def lora_pair(layer: keras.layers.Layer) -> tuple[np.ndarray, np.ndarray]:
    """A LoRA-enabled layer's `(a, b)`, with Keras's `lora_alpha / rank` folded into `b`."""
    scale = layer.lora_alpha / layer.lora_rank
    return (ops.convert_to_numpy(layer.lora_kernel_a).astype(np.float32),
            (scale * ops.convert_to_numpy(layer.lora_kernel_b)).astype(np.float32))


def save_adapters(adapters: dict[int, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """Writes `adapters` in keras-hub's `.lora.h5` layout (`lora/vars/rank`,
    `lora/{index}/vars/lora_kernel_a|b`)."""
    import h5py

    path = Path(path)
    if not path.name.endswith(".lora.h5"):
        raise ValueError(f"The file name must end in `.lora.h5`. Received: {path}")
    with h5py.File(path, "w") as file:
        file["lora/vars/rank"] = max((a.shape[-1] for a, _ in adapters.values()), default=0)
        for index, (a, b) in adapters.items():
            file[f"lora/{index}/vars/lora_kernel_a"], file[f"lora/{index}/vars/lora_kernel_b"] = a, b
    return path


def load_adapters(path: str | Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The adapters `save_adapters` wrote, as `{index: (a, b)}`."""
    import h5py

    with h5py.File(path, "r") as file:
        group = file["lora"]
        return {int(key): tuple(np.asarray(group[key]["vars"][name], np.float32)
                                for name in ("lora_kernel_a", "lora_kernel_b"))
                for key in group if key != "vars"}


def batched_equation(equation: str) -> str:
    """An `EinsumDense` equation whose kernel gains the batch axis and whose last kernel and
    output axes become the adapter rank: `"abc,cde->abde"` -> `"abc,acdz->abdz"`.

    Raises:
        ValueError: The equation's batch axis is not the input's first, is in the kernel, or
            the kernel's last axis is not the output's last.
    """
    try:
        inputs, output = equation.replace(" ", "").split("->")
        source, kernel = inputs.split(",")
    except ValueError:
        source = kernel = output = ""
    batch = source[:1]
    if (not batch or batch == "." or batch in kernel or not kernel or kernel[-1] != output[-1:]
            or _RANK_LETTER in equation):
        raise ValueError(
            "An adapted EinsumDense needs the batch as the input's first axis (not in the kernel) and "
            f"the kernel's last axis as the output's last. Received: equation={equation!r}"
        )
    return f"{source},{batch}{kernel[:-1]}{_RANK_LETTER}->{output[:-1]}{_RANK_LETTER}"


def per_example_delta(layer: keras.layers.Layer, inputs, a, b):
    """What adapters add to `layer`'s pre-activation output for `inputs`: example `i` gets
    `inputs[i]` through its own `a[i]` (`(batch, *kernel_shape[:-1], rank)`) and `b[i]`
    (`(batch, rank, out)`)."""
    batch, rank = ops.shape(inputs)[0], a.shape[-1]
    if isinstance(layer, keras.layers.EinsumDense):
        low = ops.einsum(batched_equation(layer.equation), inputs, a)
    elif isinstance(layer, keras.layers.Dense):
        flat = ops.reshape(inputs, (batch, -1, ops.shape(inputs)[-1]))
        low = ops.reshape(ops.matmul(flat, a), tuple(ops.shape(inputs)[:-1]) + (rank,))
    else:
        patches = ops.image.extract_patches(inputs, tuple(layer.kernel_size), strides=tuple(layer.strides),
                                            dilation_rate=tuple(layer.dilation_rate), padding=layer.padding)
        low = ops.einsum("bhwk,bkr->bhwr", patches, ops.reshape(a, (batch, -1, rank)))
    delta = ops.matmul(ops.reshape(low, (batch, -1, rank)), b)
    return ops.reshape(delta, tuple(ops.shape(low)[:-1]) + (b.shape[-1],))


def pre_activation(layer: keras.layers.Layer, inputs):
    """`layer`'s output for `inputs` before its activation."""
    if isinstance(layer, keras.layers.EinsumDense):
        x = ops.einsum(layer.equation, inputs, layer.kernel)
    elif isinstance(layer, keras.layers.Dense):
        x = ops.matmul(inputs, layer.kernel)
    else:
        x = layer.convolution_op(inputs, layer.kernel)
    return x if layer.bias is None else x + layer.bias
