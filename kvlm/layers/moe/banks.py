"""Expert banks: the experts of a `SparseMoE` behind one interface.

A bank maps the dispatched token buffers `(num_experts, capacity, d)` to expert
outputs of the same shape. Its expert names are known when it is made, before
`build()`; its weights are made in `build((None, d))`.

- `FFNBank`: built-in GELU FFN experts, one batched matmul over stacked weights.
- `LayerBank`: any Keras layers, each called on its own `(capacity, d)` slice.
- `PluginBank`: experts discovered from plugins by name (`kvlm.experts`), built
  with `build_expert` when the width is known; saved by name and distribution.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kvlm.experts import available, build_expert, find_expert
from kvlm.experts.factory import ensure_built
from kvlm.layers.moe.dispatch import batched_ffn


class ExpertBank(keras.layers.Layer):
    """The interface: `expert_names`, `num_experts`, `expert_layers`, `call(expert_inputs)`.

    Args:
        expert_names: One unique name per expert, in routing order.
    """

    def __init__(self, expert_names: list[str], **kwargs):
        super().__init__(**kwargs)
        expert_names = list(expert_names)
        if not expert_names or not all(isinstance(n, str) and n for n in expert_names):
            raise ValueError(f"`expert_names` must be a non-empty list of names. Received: expert_names={expert_names!r}")
        if len(set(expert_names)) != len(expert_names):
            raise ValueError(f"`expert_names` must be unique. Received: expert_names={expert_names!r}")
        self._expert_names = tuple(expert_names)

    @property
    def expert_names(self) -> list[str]:
        return list(self._expert_names)

    @property
    def num_experts(self) -> int:
        return len(self._expert_names)

    @property
    def expert_layers(self) -> list[keras.layers.Layer]:
        """One layer per expert; empty for a fused bank."""
        return []

    def call(self, expert_inputs):
        """`(num_experts, capacity, d)` -> `(num_experts, capacity, d)`."""
        raise NotImplementedError(f"{type(self).__name__} must implement call(expert_inputs)")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package="kvlm")
class FFNBank(ExpertBank):
    """`num_experts` GELU FFN experts computed together over stacked `(E, d, h)` / `(E, h, d)` weights.

    Args:
        num_experts: Number of experts.
        hidden_dim: Inner width (default `4 * d`).
        activation: Activation of the inner layer.
        kernel_initializer: Initializer of the stacked kernels.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int | None = None,
        activation: str = "gelu",
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        **kwargs,
    ):
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"`num_experts` must be an int >= 1. Received: num_experts={num_experts!r}")
        super().__init__([f"expert_{i}" for i in range(num_experts)], **kwargs)
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        d_model = input_shape[-1]
        hidden = self.hidden_dim or 4 * d_model
        experts = self.num_experts
        init = self.kernel_initializer
        self.inner_kernel = self.add_weight(shape=(experts, d_model, hidden), initializer=init, name="inner_kernel")
        self.inner_bias = self.add_weight(shape=(experts, hidden), initializer="zeros", name="inner_bias")
        self.outer_kernel = self.add_weight(shape=(experts, hidden, d_model), initializer=init, name="outer_kernel")
        self.outer_bias = self.add_weight(shape=(experts, d_model), initializer="zeros", name="outer_bias")

    def call(self, expert_inputs):
        variables = (self.inner_kernel, self.inner_bias, self.outer_kernel, self.outer_bias)
        weights = tuple(ops.convert_to_tensor(w) for w in variables)
        return batched_ffn(expert_inputs, *weights, activation=self.activation)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            hidden_dim=self.hidden_dim,
            activation=self.activation,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


def _build_each(layers: list[keras.layers.Layer], d_model: int) -> None:
    for layer in layers:
        ensure_built(layer, d_model)


def _run_each(layers: list[keras.layers.Layer], expert_inputs):
    outputs = [layer(expert_inputs[i]) for i, layer in enumerate(layers)]
    return ops.stack([ops.cast(o, expert_inputs.dtype) for o in outputs], axis=0)


@keras.saving.register_keras_serializable(package="kvlm")
class LayerBank(ExpertBank):
    """Heterogeneous experts: Keras layers mapping `(capacity, d)` to `(capacity, d)`, each on its own slice.

    Args:
        experts: The expert layers (registered serializables, to save the bank).
        expert_names: Their names (default: the layers' names).
    """

    def __init__(self, experts: list[keras.layers.Layer], expert_names: list[str] | None = None, **kwargs):
        experts = list(experts)
        if not experts or not all(isinstance(e, keras.layers.Layer) for e in experts):
            raise ValueError(f"`experts` must be a non-empty list of Keras layers. Received: experts={experts!r}")
        super().__init__(expert_names or [e.name for e in experts], **kwargs)
        if len(self.expert_names) != len(experts):
            raise ValueError(
                f"`expert_names` must name each of the {len(experts)} experts. Received: expert_names={expert_names!r}"
            )
        self._expert_layers = experts

    @property
    def expert_layers(self) -> list[keras.layers.Layer]:
        return list(self._expert_layers)

    def build(self, input_shape):
        _build_each(self._expert_layers, input_shape[-1])

    def call(self, expert_inputs):
        return _run_each(self._expert_layers, expert_inputs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            experts=[keras.saving.serialize_keras_object(e) for e in self._expert_layers],
            expert_names=self.expert_names,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["experts"] = [keras.saving.deserialize_keras_object(e, custom_objects) for e in config["experts"]]
        return cls(**config)


@keras.saving.register_keras_serializable(package="kvlm")
class PluginBank(ExpertBank):
    """Experts from installed plugins, by name; each layer is made by `kvlm.experts.build_expert`
    in `build()` and runs on its own slice.

    Args:
        experts: Expert names, or `"installed"` (every discovered expert, sorted).
        expert_options: Dict expert name -> keyword options for `build_expert`.
        expert_distributions: Dict expert name -> pip distribution, as recorded by a
            saved model; completed from discovery, so that a missing plugin's error
            names the distribution to `pip install`.

    Raises:
        ExpertNotFoundError: a named expert is not installed.
    """

    def __init__(
        self,
        experts: list[str] | str = "installed",
        expert_options: dict[str, dict[str, Any]] | None = None,
        expert_distributions: dict[str, str] | None = None,
        **kwargs,
    ):
        recorded = dict(expert_distributions or {})
        if experts == "installed":
            experts = sorted(available())
            if not experts:
                raise ValueError(
                    'experts="installed" found no installed kvlm expert plugins. Install one '
                    "(e.g. `pip install kvlm-medical`) or pass an int or a list of names as `experts`."
                )
        super().__init__(experts, **kwargs)
        self.expert_options = dict(expert_options or {})
        self.expert_distributions = {
            name: find_expert(name, recorded.get(name)).distribution for name in self.expert_names
        }
        self._expert_layers = []

    @property
    def expert_layers(self) -> list[keras.layers.Layer]:
        return list(self._expert_layers)

    def build(self, input_shape):
        d_model = input_shape[-1]
        self._expert_layers = [build_expert(n, d_model, **self.expert_options.get(n, {})) for n in self.expert_names]
        _build_each(self._expert_layers, d_model)

    def call(self, expert_inputs):
        return _run_each(self._expert_layers, expert_inputs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            experts=self.expert_names,
            expert_options=self.expert_options,
            expert_distributions=self.expert_distributions,
        )
        return config
