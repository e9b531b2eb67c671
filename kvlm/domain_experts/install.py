"""Installing trained domain experts into their base, with no gradient step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from kvlm.domain_experts.assembly import (
    backbone_copy,
    assemble,
    branch_block,
    expert_head,
    feed_forward,
    fusion_blocks,
    grown_text_encoder,
)
from kvlm.domain_experts.base import Base, check_base
from kvlm.domain_experts.expert import DomainExpert
from kvlm.domain_experts.layers import OFF
from kvlm.domain_experts.multi_adapter import AdapterExperts
from kvlm.domain_experts.routing import OPEN_GATE, marginal_key
from kvlm.layers.fusion import FeedForward
from kvlm.layers.moe import SparseMoE
from kvlm.layers.moe.banks import LayerBank

# Temperature of the key routers: their logits are log-likelihoods, so 1 gives the posterior
# over experts under equal priors.
ROUTER_TEMPERATURE = 1.0
# Auxiliary loss weights of a learned router (`install_experts(..., router="learned")`).
LEARNED_LOAD_BALANCE = 0.01
LEARNED_Z_LOSS = 1e-3


def _moe(experts: list[FeedForward], keys, name: str) -> SparseMoE:
    """Top-1 routing per sequence by `keys` (`kvlm.layers.moe.keys`); without keys (BTX style),
    a learned top-2 router with the usual auxiliary losses."""
    learned = keys is None
    return SparseMoE(
        LayerBank(experts, [e.name for e in experts], name="experts"), top_k=2 if learned else 1,
        router_keys=keys, router_temperature=ROUTER_TEMPERATURE, routing_scope="sequence", capacity_factor=None,
        eval_capacity_factor=None, normalize_gates=True, load_balance_weight=LEARNED_LOAD_BALANCE if learned else 0.0,
        z_loss_weight=LEARNED_Z_LOSS if learned else 0.0, name=name,
    )


@dataclass
class InstalledModel:
    """A base with experts installed: the model, its vocabulary and answers, the experts' names
    (in routing order after the general expert) and their domains."""

    model: keras.Model
    vocabulary: list[str]
    answers: list[str]
    experts: list[str]
    domains: dict[str, str] = field(default_factory=dict)

    @property
    def tokenizer(self):
        """The base tokenizer with the experts' words added."""
        from kvlm.data import make_tokenizer

        return make_tokenizer(self.vocabulary, self.model.input["token_ids"].shape[1])


def installed_experts(names: Sequence[str] | None = None) -> list[DomainExpert]:
    """The trained experts of the installed plugins (`ExpertSpec.trained`): all, or those `names`.

    Raises:
        ValueError: A name is not an installed trained expert (the message lists them).
    """
    from kvlm.experts import available
    from kvlm.experts.factory import shipped_path

    trained = {name: info.spec for name, info in available().items() if info.spec.trained}
    names = sorted(trained) if names is None else list(names)
    unknown = [name for name in names if name not in trained]
    if unknown:
        raise ValueError(
            f"No installed trained expert named {', '.join(map(repr, unknown))}; installed trained experts: "
            f"{', '.join(sorted(trained)) or 'none'} (train one with `kvlm train --task domain_expert`)."
        )
    return [DomainExpert.load(shipped_path(trained[name], trained[name].trained)) for name in names]


def install_experts(
    base: Base, experts: Sequence[DomainExpert] | Sequence[str] | str = "installed", router: str = "keys"
) -> InstalledModel:
    """The base with `experts` installed, routed by their keys: no gradient step.

    Adapter experts (`DomainExpert.kind == "adapters"`) join through an `AdapterExperts`
    layer: each example is routed once on the base's encoders and runs through its expert's
    adapters, words and head, or the base's when no expert's threshold admits it.

    FFN experts: every fusion block's feed-forward becomes a `SparseMoE` over the base FFN (the general
    expert, key `base.keys[i]`) and the experts' FFNs; the head adds the experts' answers.

    Args:
        base: The base the experts were trained against.
        experts: `DomainExpert`s, names of installed trained experts, or `"installed"`
            for all of them.
        router: `"keys"` (route by the shipped keys, no training needed) or `"learned"`
            (Branch-Train-MiX: a trainable top-2 router per block, to fine-tune on mixed
            data; the answer head still routes by keys).

    Raises:
        ValueError: An expert was trained for another base, two experts share a name, a
            name is not an installed trained expert, or adapter and FFN experts are mixed.
    """
    if router not in ("keys", "learned"):
        raise ValueError(f"`router` must be 'keys' or 'learned'. Received: router={router!r}")
    if isinstance(experts, str):
        experts = installed_experts(None if experts == "installed" else [experts])
    elif experts and all(isinstance(e, str) for e in experts):
        experts = installed_experts(experts)
    for expert in experts:
        check_base(expert, base.fingerprint)
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"Each expert can be installed once. Received: experts={names}")
    kinds = {e.kind for e in experts}
    if len(kinds) > 1:
        raise ValueError(
            "Adapter experts and FFN experts cannot be installed together; train the FFN experts again "
            "(`kvlm train --task domain_expert`) to make adapter experts of them. Received: "
            + ", ".join(f"{e.name} ({e.kind})" for e in experts)
        )
    if kinds == {"adapters"}:
        if router != "keys":
            raise ValueError(f"Adapter experts route by their keys. Received: router={router!r}")
        return _install_adapters(base, experts)
    general_keys, vocabulary, answers = base.keys, base.vocabulary, base.answers
    base = base.model
    new_words = list(dict.fromkeys(w for e in experts for w in e.words if w not in vocabulary))
    new_answers = list(dict.fromkeys(a for e in experts for a in e.answers if a not in answers))
    d_model = base.backbone.hidden_dim
    blocks = []
    for i, block in enumerate(fusion_blocks(base)):
        ffns = [feed_forward(block, None, name="general", trainable=False)]
        ffns += [feed_forward(block, e.ffn_weights[i], name=e.name, trainable=False) for e in experts]
        keys = np.stack([general_keys[i]] + [e.keys[i] for e in experts]) if router == "keys" else None
        blocks.append(branch_block(block, _moe(ffns, keys, f"moe_{i}"), d_model))
    text_encoder = grown_text_encoder(base, len(new_words))
    if new_words:
        rows = np.zeros((len(new_words), d_model), np.float32)
        counts = np.zeros((len(new_words), 1), np.float32)
        for e in experts:  # a word several experts bring gets the mean of their rows
            for word, row in zip(e.words, e.word_embeddings):
                if word in new_words:
                    rows[new_words.index(word)] += row
                    counts[new_words.index(word)] += 1
        text_encoder.extra_embeddings.assign(rows / np.maximum(counts, 1.0))
    columns = [[len(answers) + new_answers.index(a) for a in e.answers] for e in experts]
    head_keys = np.stack([general_keys[-1]] + [e.keys[-1] for e in experts])
    head = expert_head(base, columns, head_keys, base_trainable=False)
    for e, expert in enumerate(experts):
        head.expert_kernels[e].assign(expert.answer_kernel)
        head.expert_biases[e].assign(expert.answer_bias)
    model = assemble(base, blocks, text_encoder, head, "installed_experts")
    return InstalledModel(model, vocabulary + new_words, answers + new_answers, names,
                          {e.name: e.domain for e in experts})


def _install_adapters(base: Base, experts: Sequence[DomainExpert]) -> InstalledModel:
    """`install_experts` for adapter experts whose base and names are checked (see there)."""
    names = [e.name for e in experts]
    vocabulary = base.vocabulary + list(dict.fromkeys(w for e in experts for w in e.words if w not in base.vocabulary))
    answers = base.answers + list(dict.fromkeys(a for e in experts for a in e.answers if a not in base.answers))
    backbone = backbone_copy(base.model)
    shapes = {}
    for expert in experts:
        for index, (a, b) in expert.adapters.items():
            rank = max(a.shape[-1], shapes.get(index, ((0,), ()))[0][-1])
            shapes[index] = (a.shape[:-1] + (rank,), (rank, b.shape[-1]))
    unknown_id = base.unknown_id
    input_gates = any(e.question_key is not None for e in experts)
    layer = AdapterExperts(backbone, names, shapes, len(base.vocabulary), unknown_id, len(vocabulary), len(answers),
                           experts[0].keys.shape[-1], input_gates=input_gates, name="adapter_experts")
    inputs = {name: keras.Input(tensor.shape[1:], dtype=tensor.dtype, name=name)
              for name, tensor in base.model.backbone.input.items()}
    model = keras.Model(inputs, layer(inputs), name="installed_experts")
    for index, (a_stack, b_stack) in layer.adapters().items():
        a_values, b_values = np.zeros(a_stack.shape, np.float32), np.zeros(b_stack.shape, np.float32)
        for slot, expert in enumerate(experts, start=1):
            if index in expert.adapters:
                a, b = expert.adapters[index]
                a_values[slot, ..., :a.shape[-1]], b_values[slot, :b.shape[0]] = a, b
        a_stack.assign(a_values)
        b_stack.assign(b_values)
    if layer.word_rows is not None:
        embeddings = keras.ops.convert_to_numpy(backbone.get_layer("text_encoder").embedding.token_embedding.embeddings)
        rows = np.broadcast_to(embeddings[unknown_id], layer.word_rows.shape).copy()
        for slot, expert in enumerate(experts, start=1):
            for word, row in zip(expert.words, expert.word_embeddings):
                rows[slot, vocabulary.index(word) - len(base.vocabulary)] = row
        layer.word_rows.assign(rows)
    kernels, biases = np.zeros(layer.answer_kernels.shape, np.float32), np.full(layer.answer_biases.shape, OFF, np.float32)
    logits = base.model.get_layer("logits")
    kernels[0, :, :len(base.answers)] = keras.ops.convert_to_numpy(logits.kernel)
    biases[0, :len(base.answers)] = keras.ops.convert_to_numpy(logits.bias)
    for slot, expert in enumerate(experts, start=1):
        columns = [answers.index(a) for a in expert.answers]
        kernels[slot][:, columns], biases[slot][columns] = expert.answer_kernel, expert.answer_bias
    layer.answer_kernels.assign(kernels)
    layer.answer_biases.assign(biases)
    layer.router_keys.assign(np.stack([e.keys[0] for e in experts]))
    layer.thresholds.assign(np.array([e.threshold for e in experts], np.float32))
    if input_gates:
        gated = [e.question_key is not None for e in experts]
        image = experts[0].keys.shape[-1] // 2
        open_key = np.concatenate([np.zeros((1, image)), np.eye(image)])  # any valid key: its gate is open
        layer.image_keys.assign(np.stack([marginal_key(e.keys[0], image) if g else open_key
                                          for e, g in zip(experts, gated)]))
        layer.question_log_probs.assign(np.stack([_installed_question_key(e, base, vocabulary) for e in experts], 1))
        for thresholds, name in ((layer.image_thresholds, "image_threshold"),
                                 (layer.question_thresholds, "question_threshold")):
            thresholds.assign(np.array([getattr(e, name) if g else OPEN_GATE for e, g in zip(experts, gated)],
                                       np.float32))
    return InstalledModel(model, vocabulary, answers, names, {e.name: e.domain for e in experts})


def _installed_question_key(expert: DomainExpert, base: Base, vocabulary: list[str]) -> np.ndarray:
    """`expert`'s question key over the installed `vocabulary`: a word the expert's tokenizer
    lacks reads as its unknown id. An expert without a question key scores every question 0."""
    if expert.question_key is None:
        return np.zeros(len(vocabulary), np.float32)
    own = {word: i for i, word in enumerate(base.vocabulary + list(expert.words))}
    return expert.question_key[[own.get(word, base.unknown_id) for word in vocabulary]].astype(np.float32)
