"""Domain experts trained against a frozen base classifier, and the base with experts installed.

A trained expert (`TrainedExpert`) holds, for one domain:

- one feed-forward network per fusion block, branched from the base's and trained with
  everything else frozen;
- embedding rows for the domain's words the base tokenizer lacks, and head columns for
  its answers the base head lacks;
- a router key per fusion block and one for the answer head: a Gaussian (mean and
  precision) of the domain's sequence features at that point, fitted on the author's data;
- the base fingerprint it was trained against, and the specialist's held-out accuracy.

`specialist_model` builds the model an expert trains in; `install_experts` builds the
base with any number of experts: every fusion block's feed-forward becomes a `SparseMoE`
over the base FFN (the general expert) and the experts' FFNs, routed per sequence to the
key under which its features are most likely, with no gradient step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from kvlm.layers.domain_experts import ExpertAnswerHead, GrownTextEncoder
from kvlm.layers.fusion import FeedForward, FusionBlock
from kvlm.layers.moe import SparseMoE
from kvlm.layers.moe.banks import LayerBank
from kvlm.layers.moe.keys import gaussian_key

EXPERT_FILE = "expert.json"
WEIGHTS_FILE = "expert.weights.npz"
# Examples router keys are computed on (their mean settles long before this).
KEY_EXAMPLES = 2048
# Temperature of the key routers: their logits are log-likelihoods, so 1 gives the posterior
# over experts under equal priors.
ROUTER_TEMPERATURE = 1.0


def fingerprint(model: keras.Model) -> str:
    """A short hash of `model`'s weights: what a trained expert names as its base."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(ops.convert_to_numpy(weight), dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class TrainedExpert:
    """What one domain's expert brings to a base model (see the module docstring).

    Attributes:
        name, domain: The expert's registry name and domain.
        base: Fingerprint of the base it was trained against.
        words: New tokens, in the order of `word_embeddings`.
        answers: New answers, in the order of the answer columns.
        ffn_weights: Per fusion block, the `FeedForward` weights (inner kernel, inner bias,
            outer kernel, outer bias).
        word_embeddings: `(len(words), d)`.
        answer_kernel, answer_bias: `(d, len(answers))` and `(len(answers),)`.
        keys: `(num_fusion_layers + 1, d + 1, d)` Gaussian router keys (`kvlm.layers.moe.keys`):
            one per fusion block, then the head's.
        metrics: The specialist's held-out figures (e.g. `accuracy`).
    """

    name: str
    domain: str
    base: str
    words: list[str]
    answers: list[str]
    ffn_weights: list[list[np.ndarray]]
    word_embeddings: np.ndarray
    answer_kernel: np.ndarray
    answer_bias: np.ndarray
    keys: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Writes `expert.json` and `expert.weights.npz` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"word_embeddings": self.word_embeddings, "answer_kernel": self.answer_kernel,
                  "answer_bias": self.answer_bias, "keys": self.keys}
        for i, weights in enumerate(self.ffn_weights):
            arrays |= {f"ffn_{i}_{j}": w for j, w in enumerate(weights)}
        np.savez_compressed(directory / WEIGHTS_FILE, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
        meta = {k: v for k, v in asdict(self).items() if k in ("name", "domain", "base", "words", "answers", "metrics")}
        meta["fusion_blocks"] = len(self.ffn_weights)
        (directory / EXPERT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "TrainedExpert":
        """Reads an expert written by `save`.

        Raises:
            FileNotFoundError: `directory` holds no `expert.json`.
        """
        directory = Path(directory)
        if not (directory / EXPERT_FILE).is_file():
            raise FileNotFoundError(f"No {EXPERT_FILE} in {directory}: not a trained kvlm expert.")
        meta = json.loads((directory / EXPERT_FILE).read_text(encoding="utf-8"))
        with np.load(directory / WEIGHTS_FILE) as arrays:
            ffn = [[arrays[f"ffn_{i}_{j}"] for j in range(4)] for i in range(meta.pop("fusion_blocks"))]
            return cls(**meta, ffn_weights=ffn, word_embeddings=arrays["word_embeddings"],
                       answer_kernel=arrays["answer_kernel"], answer_bias=arrays["answer_bias"], keys=arrays["keys"])


def _fusion_blocks(base: keras.Model) -> list[FusionBlock]:
    backbone = base.backbone
    return [backbone.get_layer(f"fusion_block_{i}") for i in range(backbone.num_fusion_layers)]


def _branch_block(block: FusionBlock, ffn: keras.layers.Layer, d_model: int) -> FusionBlock:
    """A copy of `block` (attention weights copied, frozen) whose feed-forward is `ffn`."""
    copy = FusionBlock(block.hidden_dim, block.num_heads, block.intermediate_dim, block.dropout, ffn=ffn,
                       dtype=block.dtype_policy, name=block.name)
    copy.build((None, None, d_model))
    for part in ("attention_norm", "attention", "ffn_norm"):
        getattr(copy, part).set_weights(getattr(block, part).get_weights())
        getattr(copy, part).trainable = False
    return copy


def _feed_forward(block: FusionBlock, weights: Sequence[np.ndarray] | None, name: str, trainable: bool) -> FeedForward:
    ffn = FeedForward(block.hidden_dim, block.intermediate_dim, block.dropout, dtype=block.dtype_policy, name=name)
    ffn.build((None, block.hidden_dim))
    ffn.set_weights(list(weights) if weights is not None else block.ffn.get_weights())
    ffn.trainable = trainable
    return ffn


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


def _assemble(base: keras.Model, blocks: list[FusionBlock], text_encoder, head, name: str) -> keras.Model:
    """The base's graph with new fusion blocks, text encoder and head (the other layers shared, frozen)."""
    backbone = base.backbone
    images = keras.Input((backbone.image_size, backbone.image_size, 3), dtype="float32", name="images")
    token_ids = keras.Input((backbone.sequence_length,), dtype="int32", name="token_ids")
    shared = [backbone.get_layer(n) for n in ("image_encoder", "modality_fusion", "final_norm")]
    for layer in shared:
        layer.trainable = False
    image_encoder, fusion, final_norm = shared
    x, mask, modality = fusion(image_encoder(images), text_encoder(token_ids), ops.not_equal(token_ids, 0))
    for block in blocks:
        x = block(x, padding_mask=mask, modality=modality)
    pooled = final_norm(x)[:, 0, :]
    return keras.Model({"images": images, "token_ids": token_ids}, head(pooled), name=name)


def _grown_text_encoder(base: keras.Model, extra: int):
    text_encoder = base.backbone.get_layer("text_encoder")
    text_encoder.trainable = False
    if not extra:
        return text_encoder
    grown = GrownTextEncoder(text_encoder, extra, name="grown_text_encoder")
    grown.build((None, base.backbone.sequence_length))
    return grown


def _base_head(base: keras.Model, expert_answers: list[list[int]], keys, base_trainable: bool) -> ExpertAnswerHead:
    dense = base.get_layer("logits")
    head = ExpertAnswerHead(base.num_classes, expert_answers, router_keys=keys, base_trainable=base_trainable,
                            dtype="float32", name="answer_head")
    head.build((None, dense.kernel.shape[0]))
    head.base_kernel.assign(ops.convert_to_numpy(dense.kernel))
    head.base_bias.assign(ops.convert_to_numpy(dense.bias))
    return head


def specialist_model(base: keras.Model, num_words: int, num_answers: int) -> keras.Model:
    """The model a domain expert trains in.

    `base` (a trained `VLMClassifier`) is frozen; every fusion block gets a trainable branch
    of its FFN, the text encoder `num_words` new embedding rows and the head `num_answers`
    new answer columns after the base's.
    """
    d_model = base.backbone.hidden_dim
    blocks = []
    for i, block in enumerate(_fusion_blocks(base)):
        blocks.append(_branch_block(block, _feed_forward(block, None, name=f"branch_{i}", trainable=True), d_model))
    text_encoder = _grown_text_encoder(base, num_words)
    columns = list(range(base.num_classes, base.num_classes + num_answers))
    head = _base_head(base, [columns], None, base_trainable=False)
    return _assemble(base, blocks, text_encoder, head, "specialist")


def specialist_weights(model: keras.Model) -> dict[str, Any]:
    """The trained parts of a `specialist_model`: `ffn_weights`, `word_embeddings`, `answer_kernel`, `answer_bias`."""
    blocks = [layer for layer in model.layers if isinstance(layer, FusionBlock)]
    ffn = [[np.asarray(w) for w in block.ffn.get_weights()] for block in blocks]
    head = model.get_layer("answer_head")
    grown = [layer for layer in model.layers if isinstance(layer, GrownTextEncoder)]
    d_model = head.base_kernel.shape[0]
    rows = ops.convert_to_numpy(grown[0].extra_embeddings) if grown else np.zeros((0, d_model), np.float32)
    return {
        "ffn_weights": ffn,
        "word_embeddings": np.asarray(rows),
        "answer_kernel": np.asarray(ops.convert_to_numpy(head.expert_kernels[0])),
        "answer_bias": np.asarray(ops.convert_to_numpy(head.expert_biases[0])),
    }


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


BASE_FILE = "kvlm.json"


@dataclass
class Base:
    """A trained base classifier with what experts are trained and installed against.

    Attributes:
        model: The `VLMClassifier` (with its `VLMPreprocessor`).
        keys: Its own `(fusion blocks + 1, d + 1, d)` router keys, on its general training data.
        metrics: Its held-out figures.
    """

    model: keras.Model
    keys: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def vocabulary(self) -> list[str]:
        return list(self.model.preprocessor.tokenizer.get_vocabulary())

    @property
    def answers(self) -> list[str]:
        return list(self.model.preprocessor.answers)

    @property
    def tokenizer(self):
        return self.model.preprocessor.tokenizer

    @property
    def sequence_length(self) -> int:
        return self.model.backbone.sequence_length

    @property
    def image_size(self) -> int:
        return self.model.backbone.image_size

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.model)

    def save(self, preset: str | Path) -> Path:
        """Writes the model as a keras-hub preset folder, with `kvlm.json` (fingerprint, keys, metrics)."""
        folder = self.model.save_to_preset(preset)
        meta = {"fingerprint": self.fingerprint, "router_keys": self.keys.tolist(), "metrics": self.metrics}
        (Path(folder) / BASE_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")
        return Path(folder)

    @classmethod
    def load(cls, preset: str | Path = "kvlm_tiny_vqa") -> "Base":
        """A base saved by `save`: a folder, or a preset shipped in `kvlm.presets` by name."""
        from kvlm.models.classifier import VLMClassifier
        from kvlm.models.preset_dir import resolve

        folder = Path(resolve(preset))
        if not (folder / BASE_FILE).is_file():
            raise FileNotFoundError(f"No {BASE_FILE} in {folder}: not a kvlm base (see `scripts/release_base.py`).")
        meta = json.loads((folder / BASE_FILE).read_text(encoding="utf-8"))
        base = cls(VLMClassifier.from_preset(folder), np.asarray(meta["router_keys"], np.float32), meta["metrics"])
        if base.fingerprint != meta["fingerprint"]:
            raise ValueError(f"The weights in {folder} are not those of the base {meta['fingerprint']} it names.")
        return base


def check_base(expert: TrainedExpert, base_fingerprint: str) -> None:
    """Raises unless `expert` was trained against the base with `base_fingerprint`."""
    if expert.base != base_fingerprint:
        raise ValueError(
            f"The expert {expert.name!r} was trained for the base {expert.base}, but this base is "
            f"{base_fingerprint}; train it again against this base (`kvlm experts train`)."
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


def installed_experts(names: Sequence[str] | None = None) -> list[TrainedExpert]:
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
    return [TrainedExpert.load(shipped_path(trained[name], trained[name].trained)) for name in names]


def install_experts(
    base: Base, experts: Sequence[TrainedExpert] | Sequence[str] | str = "installed", router: str = "keys"
) -> InstalledModel:
    """The base with `experts` installed, routed by their keys: no gradient step.

    Every fusion block's feed-forward becomes a `SparseMoE` over the base FFN (the general
    expert, key `base.keys[i]`) and the experts' FFNs; the head adds the experts' answers.

    Args:
        base: The base the experts were trained against.
        experts: `TrainedExpert`s, names of installed trained experts, or `"installed"`
            for all of them.
        router: `"keys"` (route by the shipped keys, no training needed) or `"learned"`
            (Branch-Train-MiX: a trainable top-2 router per block, to fine-tune on mixed
            data; the answer head still routes by keys).

    Raises:
        ValueError: An expert was trained for another base, two experts share a name, or
            a name is not an installed trained expert.
    """
    if router not in ("keys", "learned"):
        raise ValueError(f"`router` must be 'keys' or 'learned'. Received: router={router!r}")
    if isinstance(experts, str):
        experts = installed_experts(None if experts == "installed" else [experts])
    elif experts and all(isinstance(e, str) for e in experts):
        experts = installed_experts(experts)
    base_print, general_keys = base.fingerprint, base.keys
    vocabulary, answers = base.vocabulary, base.answers
    base = base.model
    for expert in experts:
        check_base(expert, base_print)
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"Each expert can be installed once. Received: experts={names}")
    new_words = list(dict.fromkeys(w for e in experts for w in e.words if w not in vocabulary))
    new_answers = list(dict.fromkeys(a for e in experts for a in e.answers if a not in answers))
    d_model = base.backbone.hidden_dim
    blocks = []
    for i, block in enumerate(_fusion_blocks(base)):
        ffns = [_feed_forward(block, None, name="general", trainable=False)]
        ffns += [_feed_forward(block, e.ffn_weights[i], name=e.name, trainable=False) for e in experts]
        keys = np.stack([general_keys[i]] + [e.keys[i] for e in experts]) if router == "keys" else None
        blocks.append(_branch_block(block, _moe(ffns, keys, f"moe_{i}"), d_model))
    text_encoder = _grown_text_encoder(base, len(new_words))
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
    head = _base_head(base, columns, head_keys, base_trainable=False)
    for e, expert in enumerate(experts):
        head.expert_kernels[e].assign(expert.answer_kernel)
        head.expert_biases[e].assign(expert.answer_bias)
    model = _assemble(base, blocks, text_encoder, head, "installed_experts")
    return InstalledModel(model, vocabulary + new_words, answers + new_answers, names,
                          {e.name: e.domain for e in experts})
