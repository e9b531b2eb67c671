"""Sparse Mixture-of-Experts feed-forward layer with built-in or plugin experts."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from kvlm.layers.moe import router as routing_lib
from kvlm.layers.moe.banks import ExpertBank, FFNBank, PluginBank
from kvlm.layers.moe.dispatch import combine, dispatch
from kvlm.layers.moe.keys import key_logits, l2_normalize, stored_keys, validate_keys

ROUTERS = ("tokens_choose", "experts_choose")
ROUTING_SCOPES = ("token", "sequence")


@keras.saving.register_keras_serializable(package="kvlm")
class SparseMoE(keras.layers.Layer):
    """Sparse MoE feed-forward: a float32 router sends each token to a few experts.

    Tokens of all sequences in the batch are flattened and routed together.
    Each expert has `capacity = ceil(capacity_factor * top_k * tokens / experts)`
    slots (a static expression of the batch where the backend traces one: an int, or a JAX
    symbolic dimension; a tensor for TensorFlow's unknown batch); tokens are gathered into the slots by
    index, the experts run on `(capacity, d)` buffers, and outputs are gathered /
    scatter-added back, so compute grows with `top_k * capacity`, not with the
    number of experts. Tokens over capacity are dropped: their output is 0 and
    the surrounding residual passes them through. Padding tokens (mask False)
    are never routed and never count in losses or statistics.

    The experts are a bank (`kvlm.layers.moe.banks`), resolved from `experts` when
    the layer is made: an `FFNBank` for an int, a `PluginBank` for names, or the
    `ExpertBank` given.

    Key routing (PHATGOOSE / Arrow / c-BTM): with `router_keys`, the router is
    fixed, with no trainable weight: the logits of a token are the cosine
    similarities of its features to the per-expert keys (e.g. each independently
    trained expert's mean L2-normalized input feature at this position), divided
    by `router_temperature`; with Gaussian keys (a mean and a precision factor per
    expert, fitted on its author's data) they are the features' log-likelihoods,
    which also tell apart domains whose mean features are close. Experts trained
    apart are thus routed to with no gradient step. The keys are a non-trainable
    float32 weight `router_keys`, so no loss moves them; use `load_balance_weight=0` (and `z_loss_weight=0`) with
    keys, otherwise those losses push the upstream layers being fine-tuned away
    from the keys.

    With `routing_scope="sequence"` every sequence of a `(batch, seq, d)` input is
    routed as one document (c-BTM / DEMix): its routing features are the masked
    mean of its real tokens' features (L2-normalized before and after averaging
    with keys), so all its real tokens pick the same experts, while each expert
    still processes the tokens' own features.

    Args:
        experts: An int (that many built-in GELU FFN experts, computed with one
            batched matmul over stacked `(E, d, h)` / `(E, h, d)` weights), a list
            of expert names from `kvlm.experts`, `"installed"` (every discovered
            expert), or an `ExpertBank` (e.g. a `LayerBank` of your own layers).
            Named experts are built in `build()` with `kvlm.experts.build_expert`
            and each runs on its own token slice.
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
        normalize_gates: Renormalize the top-k gates to sum to 1 (with top_k=1 every gate is 1).
        load_balance_weight: Weight of the Switch load-balancing loss.
        z_loss_weight: Weight of the router z-loss.
        entropy_weights: LIMoE entropy loss weights: a float for all four terms
            or a dict with keys `image_local`, `image_global`, `text_local`,
            `text_global`. 0 is off. Uses the `modality` ids of `call`.
        activation: Activation of the built-in and shared experts.
        expert_options: Dict expert name -> keyword options for `build_expert`.
        expert_distributions: Dict expert name -> pip distribution; filled from
            discovery for named experts and kept in the config so that a missing
            plugin gives a `pip install` hint.
        kernel_initializer: Initializer of the built-in expert kernels.
        router_initializer: Initializer of the float32 router kernel.
        seed: Seed of the gating noise.
        router_keys: None (a trainable linear router `router_kernel (d, E)`),
            cosine keys `(num_experts, d)` (one non-zero key per expert: route by
            cosine similarity, stored L2-normalized), or Gaussian keys
            `(num_experts, d + 1, d)` (per expert a mean and a precision factor:
            route by log-likelihood); see `kvlm.layers.moe.keys`. Replace them
            with `set_router_keys`.
        router_temperature: Temperature (> 0) dividing the key logits.
        routing_scope: `"token"` (each token routed on its own features) or
            `"sequence"` (each sequence routed on its real tokens' mean
            features; needs `(batch, seq, d)` inputs).

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
        router_keys: Any = None,
        router_temperature: float = 0.05,
        routing_scope: str = "token",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True
        if isinstance(experts, tuple):
            experts = list(experts)
        if isinstance(experts, bool) or not (
            isinstance(experts, (int, list, ExpertBank)) or experts == "installed"
        ):
            raise ValueError(
                '`experts` must be an int, a list of expert names, "installed" or an ExpertBank. '
                f"Received: experts={experts!r}"
            )
        if isinstance(experts, int) and experts < 1:
            raise ValueError(f"`experts` must be >= 1. Received: experts={experts}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"`top_k` must be an int >= 1. Received: top_k={top_k!r}")
        if router not in ROUTERS:
            raise ValueError(f"`router` must be one of {ROUTERS}. Received: router={router!r}")
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
        kernel_initializer = keras.initializers.get(kernel_initializer)
        if isinstance(experts, ExpertBank):
            self.bank = experts
        elif isinstance(experts, int):
            self.bank = FFNBank(experts, expert_hidden_dim, activation, kernel_initializer, dtype=self.dtype_policy,
                                name="experts")
        else:
            self.bank = PluginBank(experts, expert_options, expert_distributions, name="experts")
        if router == "tokens_choose" and top_k > self.bank.num_experts:
            raise ValueError(
                f"`top_k` must be <= the number of experts. Received: top_k={top_k}, experts={self.bank.expert_names}"
            )
        if (
            isinstance(router_temperature, bool)
            or not isinstance(router_temperature, (int, float))
            or not router_temperature > 0
        ):
            raise ValueError(
                f"`router_temperature` must be a float > 0. Received: router_temperature={router_temperature!r}"
            )
        if routing_scope not in ROUTING_SCOPES:
            raise ValueError(
                f"`routing_scope` must be one of {ROUTING_SCOPES}. Received: routing_scope={routing_scope!r}"
            )
        self._router_keys = None if router_keys is None else self._validate_router_keys(router_keys)

        self.experts = None if isinstance(experts, ExpertBank) else experts  # None: see `bank`
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
        self.kernel_initializer = kernel_initializer
        self.router_initializer = keras.initializers.get(router_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if noisy_gating else None
        self.router_temperature = float(router_temperature)
        self.routing_scope = routing_scope

    def _validate_router_keys(self, keys) -> np.ndarray:
        """`keys` as float32 cosine or Gaussian keys (`kvlm.layers.moe.keys`), as given."""
        return validate_keys(keys, self.num_experts, self.expert_names)

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
    def num_experts(self) -> int:
        return self.bank.num_experts

    @property
    def expert_names(self) -> list[str]:
        """Expert names (`expert_i` for built-in experts), in routing order."""
        return self.bank.expert_names

    @property
    def noise_std(self) -> float:
        if self.noisy_gating is True:
            return 1.0 / self.num_experts
        return float(self.noisy_gating or 0.0)

    def build(self, input_shape):
        if self.built:  # e.g. deserialized with its build config, then built again by its parent
            return
        d_model = input_shape[-1]
        if d_model is None:
            raise ValueError(f"The last input dimension must be known. Received: input_shape={input_shape}")
        num_experts = self.num_experts
        hidden = self.expert_hidden_dim or 4 * d_model
        if self._router_keys is None:
            self.router_kernel = self.add_weight(
                shape=(d_model, num_experts),
                initializer=self.router_initializer,
                dtype="float32",
                autocast=False,
                name="router_kernel",
            )
        else:
            if self._router_keys.shape[-1] != d_model:
                raise ValueError(
                    f"`router_keys` must have width d={d_model} (num_experts={num_experts}, d) or "
                    f"(num_experts={num_experts}, d + 1, d) for inputs of "
                    f"width {d_model}. Received: router_keys.shape={self._router_keys.shape}"
                )
            self.router_keys = self.add_weight(
                shape=self._router_keys.shape,
                initializer="zeros",
                dtype="float32",
                autocast=False,
                trainable=False,
                name="router_keys",
            )
            self.router_keys.assign(stored_keys(self._router_keys))
        if not self.bank.built:
            self.bank.build((None, d_model))
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

    def set_router_keys(self, keys) -> None:
        """Replaces the router keys by `keys` of the same shape (stored L2-normalized).

        Raises:
            ValueError: the layer routes with a learned kernel, or `keys` is not a
                valid `(num_experts, d)` array of non-zero keys of the same width.
        """
        if self._router_keys is None:
            raise ValueError(
                "`set_router_keys` needs a layer made with `router_keys`; this layer has a learned router. "
                "Received: router_keys=None"
            )
        keys = self._validate_router_keys(keys)
        if keys.shape != self._router_keys.shape:
            raise ValueError(
                f"`router_keys` must keep the shape {self._router_keys.shape}. Received: router_keys.shape={keys.shape}"
            )
        self._router_keys = keys
        if self.built:
            self.router_keys.assign(stored_keys(keys))

    def _router_inputs(self, x, mask):
        """Flat float32 routing features `(tokens, f)` and the kernel `(f, experts)` they are routed
        with: the tokens' features and `router_kernel`, or with keys their key logits and the
        identity over `router_temperature`."""
        features = ops.cast(x, "float32")
        keyed = self._router_keys is not None
        d_model = x.shape[-1]
        if keyed:
            features = l2_normalize(features)
        if self.routing_scope == "sequence":
            if len(x.shape) != 3:
                raise ValueError(
                    'routing_scope="sequence" needs inputs of rank 3 (batch, seq, d). '
                    f"Received: x.shape={tuple(x.shape)}"
                )
            weights = ops.ones_like(features[..., 0]) if mask is None else ops.cast(mask, "float32")
            total = ops.sum(features * weights[..., None], axis=1, keepdims=True)
            count = ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1.0)[..., None]
            mean = l2_normalize(total) if keyed else total / count
            if keyed:  # one score per sequence, shared by its tokens
                mean = ops.expand_dims(key_logits(ops.reshape(mean, (-1, d_model)), self.router_keys), 1)
            shape = ops.shape(features)
            features = ops.broadcast_to(mean, (shape[0], shape[1], mean.shape[-1]))
        elif keyed:
            features = key_logits(ops.reshape(features, (-1, d_model)), self.router_keys)
        features = ops.reshape(features, (-1, features.shape[-1]))
        if keyed:
            kernel = ops.eye(self.num_experts, dtype="float32") / self.router_temperature
        else:
            kernel = ops.convert_to_tensor(self.router_kernel)
        return features, kernel

    def _route(self, features, kernel, mask_flat, modality_flat, training: bool):
        """Routing, weighted aux losses, statistics and capacity for flat routing features."""
        num_tokens = routing_lib.num_tokens_of(features)
        noise = None
        if training and self.noise_std > 0:
            shape = (num_tokens, self.num_experts)
            noise = keras.random.normal(shape, stddev=self.noise_std, seed=self.seed_generator)
        factor = self.capacity_factor if training else self.eval_capacity_factor
        capacity = routing_lib.compute_capacity(num_tokens, self.num_experts, self.top_k, factor)
        entropy_weights = tuple((k, w) for k, w in self._entropy_weights.items() if w > 0)
        routing, losses, statistics = routing_lib.route(
            features,
            mask_flat,
            modality_flat,
            kernel,
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
        expert_inputs = dispatch(x_flat, routing.token_table, self.num_experts, capacity)
        return combine(self.bank(expert_inputs), routing, num_tokens)

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
        features, kernel = self._router_inputs(x, mask)
        routing, losses, statistics, capacity = self._route(features, kernel, mask_flat, modality_flat, training)
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
        _, mask_flat, _, num_tokens = self._flatten(x, mask, None)
        features, kernel = self._router_inputs(x, mask)
        routing = self._route(features, kernel, mask_flat, None, bool(training))[0]
        table = np.asarray(ops.convert_to_numpy(routing.token_table)).reshape(self.num_experts, -1)
        return (table < num_tokens).sum(axis=1).astype("int64")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        if self.experts is None:
            experts = keras.saving.serialize_keras_object(self.bank)
        else:
            experts = self.experts if isinstance(self.experts, int) else self.bank.expert_names
        distributions = self.bank.expert_distributions if isinstance(self.bank, PluginBank) else {}
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
            expert_distributions=distributions,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            router_initializer=keras.initializers.serialize(self.router_initializer),
            seed=self.seed,
            router_keys=None if self._router_keys is None else self._router_keys.tolist(),
            router_temperature=self.router_temperature,
            routing_scope=self.routing_scope,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if isinstance(config.get("experts"), dict):
            config = {**config, "experts": keras.saving.deserialize_keras_object(config["experts"], custom_objects)}
        return cls(**config)
