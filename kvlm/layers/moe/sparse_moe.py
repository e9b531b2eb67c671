"""Sparse Mixture-of-Experts feed-forward layer with built-in or plugin experts."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from kvlm.layers.moe import router as routing_lib
from kvlm.layers.moe.dispatch import builtin_experts_forward, combine, dispatch

ROUTERS = ("tokens_choose", "experts_choose")


@keras.saving.register_keras_serializable(package="kvlm")
class SparseMoE(keras.layers.Layer):
    """Sparse MoE feed-forward: a float32 router sends each token to a few experts.

    Tokens of all sequences in the batch are flattened and routed together.
    Each expert has `capacity = ceil(capacity_factor * top_k * tokens / experts)`
    slots (computed from static shapes); tokens are gathered into the slots by
    index, the experts run on `(capacity, d)` buffers, and outputs are gathered /
    scatter-added back, so compute grows with `top_k * capacity`, not with the
    number of experts. Tokens over capacity are dropped: their output is 0 and
    the surrounding residual passes them through. Padding tokens (mask False)
    are never routed and never count in losses or statistics.

    Args:
        experts: An int (that many built-in GELU FFN experts, computed with one
            batched matmul over stacked `(E, d, h)` / `(E, h, d)` weights), a list
            of expert names from `kvlm.experts`, or `"installed"` (every
            discovered expert). Named experts are built in `build()` with
            `kvlm.experts.build_expert` and each runs on its own token slice.
        top_k: Experts per token (1 = Switch, 2 = GShard / V-MoE). For
            `"experts_choose"` it is the average number of experts per token
            used to size the capacity.
        router: `"tokens_choose"` (top-k token choice) or `"experts_choose"`
            (expert choice: each expert takes its top-capacity tokens).
        capacity_factor: Capacity factor in training; `None` never drops.
        eval_capacity_factor: Capacity factor in inference; `None` never drops.
        expert_hidden_dim: Width of built-in and shared experts (default `4 * d`).
        shared_expert: Add a dense FFN applied to every real token.
        noisy_gating: False, True (noise std `1 / experts`, V-MoE) or a float std
            of Gaussian noise added to router logits in training.
        batch_prioritized: On overflow, tokens with the highest top-1 router
            probability win (BPR); otherwise earlier positions win.
        normalize_gates: Renormalize the top-k gates to sum to 1 (top_k > 1).
        load_balance_weight: Weight of the Switch load-balancing loss.
        z_loss_weight: Weight of the router z-loss.
        entropy_weights: LIMoE entropy loss weights: a float for all four terms
            or a dict with keys `image_local`, `image_global`, `text_local`,
            `text_global`. 0 is off. Uses the `modality` ids of `call`.
        activation: Activation of the built-in and shared experts.
        expert_options: Dict expert name -> keyword options for `build_expert`.
        expert_distributions: Dict expert name -> pip distribution; filled in
            `build()` for named experts and kept in the config so that a missing
            plugin gives a `pip install` hint.
        kernel_initializer: Initializer of the built-in expert kernels.
        router_initializer: Initializer of the float32 router kernel.
        seed: Seed of the gating noise.

    Call args:
        x: `(..., d)`, e.g. `(batch, seq, d)`.
        mask: Optional bool of `x.shape[:-1]`, False for padding.
        modality: Optional int ids of `x.shape[:-1]` (0 image, 1 text, 2 [CLS]).
        training: Training mode (capacity factor, gating noise).

    Statistics of the last call are non-trainable variables: `expert_load`
    (fraction of routed assignments per expert), `dropped_token_fraction` (real
    tokens processed by no expert) and `router_entropy` (mean per-token routing
    entropy). `routing_counts(x, mask)` returns tokens routed per expert.
    """

    def __init__(
        self,
        experts: int | list[str] | str = "installed",
        top_k: int = 2,
        router: str = "tokens_choose",
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        expert_hidden_dim: int | None = None,
        shared_expert: bool = False,
        noisy_gating: bool | float = False,
        batch_prioritized: bool = True,
        normalize_gates: bool = False,
        load_balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        entropy_weights: float | dict[str, float] = 0.0,
        activation: str = "gelu",
        expert_options: dict[str, dict[str, Any]] | None = None,
        expert_distributions: dict[str, str] | None = None,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        router_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True
        if isinstance(experts, tuple):
            experts = list(experts)
        if isinstance(experts, bool) or not (
            isinstance(experts, int) or isinstance(experts, list) or experts == "installed"
        ):
            raise ValueError(
                '`experts` must be an int, a list of expert names or "installed". '
                f"Received: experts={experts!r}"
            )
        if isinstance(experts, int) and experts < 1:
            raise ValueError(f"`experts` must be >= 1. Received: experts={experts}")
        if isinstance(experts, list):
            if not experts or not all(isinstance(n, str) and n for n in experts):
                raise ValueError(f"`experts` must be a non-empty list of names. Received: experts={experts!r}")
            if len(set(experts)) != len(experts):
                raise ValueError(f"`experts` names must be unique. Received: experts={experts!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"`top_k` must be an int >= 1. Received: top_k={top_k!r}")
        if router not in ROUTERS:
            raise ValueError(f"`router` must be one of {ROUTERS}. Received: router={router!r}")
        known = experts if isinstance(experts, int) else len(experts) if isinstance(experts, list) else None
        if router == "tokens_choose" and known is not None and top_k > known:
            raise ValueError(
                f"`top_k` must be <= the number of experts. Received: top_k={top_k}, experts={experts!r}"
            )
        for arg, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if value is not None and not value > 0:
                raise ValueError(f"`{arg}` must be > 0 or None. Received: {arg}={value!r}")
        if expert_hidden_dim is not None and expert_hidden_dim < 1:
            raise ValueError(f"`expert_hidden_dim` must be >= 1. Received: expert_hidden_dim={expert_hidden_dim}")
        if not isinstance(noisy_gating, bool) and not (
            isinstance(noisy_gating, (int, float)) and noisy_gating >= 0
        ):
            raise ValueError(
                f"`noisy_gating` must be a bool or a float >= 0. Received: noisy_gating={noisy_gating!r}"
            )
        for arg, value in (("load_balance_weight", load_balance_weight), ("z_loss_weight", z_loss_weight)):
            if value < 0:
                raise ValueError(f"`{arg}` must be >= 0. Received: {arg}={value}")
        self._entropy_weights = self._validate_entropy_weights(entropy_weights)
        if not isinstance(activation, str):
            raise ValueError(
                f"`activation` must be the name of a Keras activation. Received: activation={activation!r}"
            )
        keras.activations.get(activation)

        self.experts = experts
        self.top_k = top_k
        self.router = router
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.expert_hidden_dim = expert_hidden_dim
        self.shared_expert = shared_expert
        self.noisy_gating = noisy_gating
        self.batch_prioritized = batch_prioritized
        self.normalize_gates = normalize_gates
        self.load_balance_weight = load_balance_weight
        self.z_loss_weight = z_loss_weight
        self.entropy_weights = entropy_weights
        self.activation = activation
        self.expert_options = dict(expert_options or {})
        self.expert_distributions = dict(expert_distributions or {})
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.router_initializer = keras.initializers.get(router_initializer)
        self.seed = seed
        self._expert_names = [f"expert_{i}" for i in range(experts)] if isinstance(experts, int) else (
            list(experts) if isinstance(experts, list) else None
        )
        self.seed_generator = keras.random.SeedGenerator(seed) if noisy_gating else None
        self.expert_layers = []

    @staticmethod
    def _validate_entropy_weights(entropy_weights) -> dict[str, float]:
        if isinstance(entropy_weights, (int, float)) and not isinstance(entropy_weights, bool):
            if entropy_weights < 0:
                raise ValueError(f"`entropy_weights` must be >= 0. Received: entropy_weights={entropy_weights}")
            return {key: float(entropy_weights) for key in routing_lib.ENTROPY_KEYS}
        if isinstance(entropy_weights, dict):
            unknown = set(entropy_weights) - set(routing_lib.ENTROPY_KEYS)
            if unknown or any(v < 0 for v in entropy_weights.values()):
                raise ValueError(
                    f"`entropy_weights` keys must be in {routing_lib.ENTROPY_KEYS} with values >= 0. "
                    f"Received: entropy_weights={entropy_weights!r}"
                )
            return {key: float(entropy_weights.get(key, 0.0)) for key in routing_lib.ENTROPY_KEYS}
        raise ValueError(f"`entropy_weights` must be a float or a dict. Received: entropy_weights={entropy_weights!r}")

    @property
    def num_experts(self) -> int | None:
        """Number of experts (None for `"installed"` before `build()`)."""
        return None if self._expert_names is None else len(self._expert_names)

    @property
    def expert_names(self) -> list[str] | None:
        """Expert names (`expert_i` for built-in experts), in routing order."""
        return None if self._expert_names is None else list(self._expert_names)

    @property
    def noise_std(self) -> float:
        if self.noisy_gating is True:
            return 1.0 / self.num_experts
        return float(self.noisy_gating or 0.0)

    def _resolve_named_experts(self, d_model: int) -> None:
        try:
            import kvlm.experts as registry
            from kvlm.experts import available, build_expert
        except ImportError as error:
            raise ImportError(
                f"SparseMoE(experts={self.experts!r}) needs the `kvlm.experts` plugin registry, "
                f"which could not be imported: {error}"
            ) from error
        specs = available()
        if self.experts == "installed":
            names = sorted(specs)
            if not names:
                raise ValueError(
                    'SparseMoE(experts="installed") found no installed kvlm expert plugins. Install one '
                    "(e.g. `pip install kvlm-medical`) or pass an int or a list of names as `experts`."
                )
        else:
            names = list(self.experts)
        if self.router == "tokens_choose" and self.top_k > len(names):
            raise ValueError(
                f"`top_k` must be <= the number of experts. Received: top_k={self.top_k}, experts={names}"
            )
        layers = []
        for name in names:
            info = specs.get(name)
            distribution = getattr(info, "distribution", None)
            if distribution is None and isinstance(info, dict):
                distribution = info.get("distribution")
            if distribution is not None:
                self.expert_distributions[name] = distribution
            try:
                layer = build_expert(name, d_model=d_model, **self.expert_options.get(name, {}))
            except Exception as error:
                recorded = self.expert_distributions.get(name)
                if not recorded or recorded in str(error):
                    raise
                message = f"{error} Expert {name!r} is provided by `pip install {recorded}`."
                not_found = getattr(registry, "ExpertNotFoundError", None)
                if not_found is not None and isinstance(error, not_found):
                    raise not_found(name, message, recorded) from error
                try:
                    new_error = type(error)(message)
                except Exception:
                    new_error = ImportError(message)
                raise new_error from error
            layers.append(layer)
        self._expert_names = names
        self.expert_layers = layers

    def build(self, input_shape):
        if self.built:  # e.g. deserialized with its build config, then built again by its parent
            return
        d_model = input_shape[-1]
        if d_model is None:
            raise ValueError(f"The last input dimension must be known. Received: input_shape={input_shape}")
        if not isinstance(self.experts, int):
            self._resolve_named_experts(d_model)
        num_experts = self.num_experts
        hidden = self.expert_hidden_dim or 4 * d_model
        self.router_kernel = self.add_weight(
            shape=(d_model, num_experts),
            initializer=self.router_initializer,
            dtype="float32",
            autocast=False,
            name="router_kernel",
        )
        if isinstance(self.experts, int):
            self.inner_kernel = self.add_weight(
                shape=(num_experts, d_model, hidden), initializer=self.kernel_initializer, name="inner_kernel"
            )
            self.inner_bias = self.add_weight(shape=(num_experts, hidden), initializer="zeros", name="inner_bias")
            self.outer_kernel = self.add_weight(
                shape=(num_experts, hidden, d_model), initializer=self.kernel_initializer, name="outer_kernel"
            )
            self.outer_bias = self.add_weight(shape=(num_experts, d_model), initializer="zeros", name="outer_bias")
        else:
            for layer in self.expert_layers:
                if not layer.built:
                    layer.build((None, d_model))
        if self.shared_expert:
            from kvlm.layers.fusion import FeedForward

            self.shared_ffn = FeedForward(d_model, hidden, dtype=self.dtype_policy, name="shared_expert")
            self.shared_ffn.build((None, d_model))
        stat = dict(trainable=False, dtype="float32", autocast=False, aggregation="mean")
        self.expert_load = self.add_weight(shape=(num_experts,), initializer="zeros", name="expert_load", **stat)
        self.dropped_token_fraction = self.add_weight(
            shape=(), initializer="zeros", name="dropped_token_fraction", **stat
        )
        self.router_entropy = self.add_weight(shape=(), initializer="zeros", name="router_entropy", **stat)

    def _route(self, x_flat, mask_flat, modality_flat, training: bool):
        """Routing, weighted aux losses, statistics and capacity for flat tokens."""
        num_tokens = routing_lib.num_tokens_of(x_flat)
        noise = None
        if training and self.noise_std > 0:
            shape = (num_tokens, self.num_experts)
            noise = keras.random.normal(shape, stddev=self.noise_std, seed=self.seed_generator)
        factor = self.capacity_factor if training else self.eval_capacity_factor
        capacity = routing_lib.compute_capacity(num_tokens, self.num_experts, self.top_k, factor)
        entropy_weights = tuple((k, w) for k, w in self._entropy_weights.items() if w > 0)
        routing, losses, statistics = routing_lib.route(
            x_flat,
            mask_flat,
            modality_flat,
            ops.convert_to_tensor(self.router_kernel),
            noise,
            router=self.router,
            top_k=self.top_k,
            capacity=capacity,
            batch_prioritized=self.batch_prioritized,
            normalize_gates=self.normalize_gates,
            load_balance_weight=self.load_balance_weight,
            z_loss_weight=self.z_loss_weight,
            entropy_weights=entropy_weights,
        )
        return routing, losses, statistics, capacity

    def _run_experts(self, x_flat, routing, capacity, num_tokens):
        if isinstance(self.experts, int):
            variables = (self.inner_kernel, self.inner_bias, self.outer_kernel, self.outer_bias)
            weights = tuple(ops.convert_to_tensor(w) for w in variables)
            return builtin_experts_forward(
                x_flat, routing, weights, num_experts=self.num_experts, capacity=capacity, activation=self.activation
            )
        expert_inputs = dispatch(x_flat, routing.token_table, self.num_experts, capacity)
        outputs = [layer(expert_inputs[i]) for i, layer in enumerate(self.expert_layers)]
        expert_outputs = ops.stack([ops.cast(o, expert_inputs.dtype) for o in outputs], axis=0)
        return combine(expert_outputs, routing, num_tokens)

    @staticmethod
    def _flatten(x, mask, modality):
        x_flat = ops.reshape(x, (-1, x.shape[-1]))
        num_tokens = routing_lib.num_tokens_of(x_flat)
        if mask is None:
            mask_flat = ops.ones((num_tokens,), dtype="bool")
        else:
            mask_flat = ops.reshape(ops.cast(mask, "bool"), (-1,))
        modality_flat = None if modality is None else ops.reshape(ops.cast(modality, "int32"), (-1,))
        return x_flat, mask_flat, modality_flat, num_tokens

    def call(self, x, mask=None, modality=None, training=None):
        training = bool(training)
        x_flat, mask_flat, modality_flat, num_tokens = self._flatten(x, mask, modality)
        routing, losses, statistics, capacity = self._route(x_flat, mask_flat, modality_flat, training)
        y = self._run_experts(x_flat, routing, capacity, num_tokens)
        if self.shared_expert:
            y = y + self.shared_ffn(x_flat, training=training) * ops.cast(mask_flat, y.dtype)[:, None]
        for key in ("load_balance", "z_loss", "entropy"):  # fixed order (jax.jit sorts dict keys)
            if key in losses:
                self.add_loss(losses[key])
        load, dropped, entropy = statistics
        self.expert_load.assign(load)
        self.dropped_token_fraction.assign(dropped)
        self.router_entropy.assign(entropy)
        return ops.reshape(ops.cast(y, x.dtype), ops.shape(x))

    def routing_counts(self, x, mask=None, training: bool = False) -> np.ndarray:
        """Number of real tokens each expert processes for `x` (after capacity), int `(experts,)`.

        Pass `mask & (modality == m)` as `mask` to count one modality or domain.
        Updates no statistics and adds no losses.
        """
        x = ops.convert_to_tensor(x)
        if not self.built:
            self.build(x.shape)
        x_flat, mask_flat, _, num_tokens = self._flatten(x, mask, None)
        routing = self._route(x_flat, mask_flat, None, bool(training))[0]
        table = np.asarray(ops.convert_to_numpy(routing.token_table)).reshape(self.num_experts, -1)
        return (table < num_tokens).sum(axis=1).astype("int64")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        experts = self.experts
        if not isinstance(experts, int) and self._expert_names is not None:
            experts = list(self._expert_names)
        config.update(
            experts=experts,
            top_k=self.top_k,
            router=self.router,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            expert_hidden_dim=self.expert_hidden_dim,
            shared_expert=self.shared_expert,
            noisy_gating=self.noisy_gating,
            batch_prioritized=self.batch_prioritized,
            normalize_gates=self.normalize_gates,
            load_balance_weight=self.load_balance_weight,
            z_loss_weight=self.z_loss_weight,
            entropy_weights=self.entropy_weights,
            activation=self.activation,
            expert_options=self.expert_options,
            expert_distributions=self.expert_distributions,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            router_initializer=keras.initializers.serialize(self.router_initializer),
            seed=self.seed,
        )
        return config
