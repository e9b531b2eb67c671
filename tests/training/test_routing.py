"""Routing reports of SparseMoE models and training on the plugin domain datasets mixed."""

from __future__ import annotations

import argparse
import json
import struct
import zlib
from collections import Counter

import keras
import numpy as np
import pytest

from kvlm.experts import datasets
from kvlm.models import VLMBackbone, VLMClassifier
from kvlm.training import TrainConfig, load_examples
from kvlm.training.routing import (
    LayerRouting,
    RoutingReport,
    format_routing_report,
    heatmap_size,
    moe_blocks,
    moe_input,
    routing_report,
    save_routing_heatmap,
)

DOMAIN_DATASETS = ["legal_documents", "medical_scans", "retail_shelves"]
NUM_EXPERTS, TOP_K, SEQUENCE_LENGTH = 4, 2, 8


def _needs_plugins():
    missing = set(DOMAIN_DATASETS) - set(datasets())
    if missing:
        pytest.skip(f"first-party plugins not installed: {sorted(missing)}")


@pytest.fixture(scope="module")
def moe_model():
    """A small classifier with SparseMoE in fusion blocks 1 and 3 and known router weights."""
    keras.utils.set_random_seed(7)
    backbone = VLMBackbone(
        vocabulary_size=40, image_size=32, encoder="cnn", cnn_filters=8, cnn_stages=2,
        sequence_length=SEQUENCE_LENGTH, hidden_dim=16, num_heads=2, intermediate_dim=32,
        num_fusion_layers=4,
        moe={"experts": NUM_EXPERTS, "top_k": TOP_K, "eval_capacity_factor": None, "expert_hidden_dim": 8},
    )
    model = VLMClassifier(backbone, num_classes=3)
    rng = np.random.default_rng(11)
    for _, moe in moe_blocks(model):
        moe.router_kernel.assign(rng.normal(0.0, 3.0, (16, NUM_EXPERTS)).astype("float32"))
    return model


def _batches():
    """Two batches of 4 examples from domains "a" and "b", with text padding."""
    rng = np.random.default_rng(5)
    batches = []
    for domains in (["a", "b", "a", "a"], ["b", "b", "a", "b"]):
        token_ids = np.zeros((4, SEQUENCE_LENGTH), dtype="int32")
        for i, length in enumerate(rng.integers(1, SEQUENCE_LENGTH + 1, 4)):
            token_ids[i, :length] = rng.integers(1, 40, length)
        images = rng.random((4, 32, 32, 3), dtype=np.float32)
        batches.append(({"images": images, "token_ids": token_ids}, domains))
    return batches


def _block_inputs(model, features):
    """The inputs (x, padding mask, modality) of every SparseMoE fusion block."""
    backbone = model.backbone
    blocks = moe_blocks(model)
    masks = [backbone.output["padding_mask"], backbone.output["modality"]]
    probe = keras.Model(backbone.input, [block.input[0] for block, _ in blocks] + masks)
    *xs, mask, modality = probe({k: keras.ops.convert_to_tensor(v) for k, v in features.items()})
    return [(block, moe, x, mask, modality) for (block, moe), x in zip(blocks, xs)]


def test_moe_input_is_what_the_fusion_block_feeds_its_moe(moe_model):
    features, _ = _batches()[0]
    for block, moe, x, mask, modality in _block_inputs(moe_model, features):
        h = moe_input(block, x, mask)
        # The block returns `residual + moe(h)` with `h = ffn_norm(residual)`: taking moe(h)
        # away must leave a residual whose normalization is h again.
        output = block(x, padding_mask=mask, modality=modality, training=False)
        residual = output - moe(h, mask=mask, modality=modality, training=False)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(block.ffn_norm(residual)), keras.ops.convert_to_numpy(h), atol=1e-4
        )


def test_routing_report_matches_a_hand_count(moe_model):
    batches = _batches()
    report = routing_report(moe_model, batches)
    assert report.domains == ("a", "b")
    assert [layer.name for layer in report.layers] == ["moe_1", "moe_3"]
    assert list(report.examples) == [4, 4]

    hand = {layer.name: np.zeros((2, NUM_EXPERTS), np.int64) for layer in report.layers}
    tokens = np.zeros(2, np.int64)
    for features, domains in batches:
        inputs = _block_inputs(moe_model, features)
        for d, domain in enumerate(report.domains):
            rows = np.array(domains) == domain
            # Real tokens: [CLS] + image tokens + the non-padding text tokens.
            num_image = inputs[0][2].shape[1] - 1 - SEQUENCE_LENGTH
            tokens[d] += rows.sum() * (1 + num_image) + np.count_nonzero(features["token_ids"][rows])
        for block, moe, x, mask, _ in inputs:
            h = keras.ops.convert_to_numpy(moe_input(block, x, mask)).astype(np.float64)
            logits = h @ keras.ops.convert_to_numpy(moe.router_kernel).astype(np.float64)
            chosen = np.argsort(-logits, axis=-1)[..., :TOP_K]  # (batch, seq, k)
            mask = keras.ops.convert_to_numpy(mask).astype(bool)
            for d, domain in enumerate(report.domains):
                real = mask & (np.array(domains) == domain)[:, None]
                hand[moe.name][d] += np.bincount(chosen[real].reshape(-1), minlength=NUM_EXPERTS)
    np.testing.assert_array_equal(report.tokens, tokens)
    for layer in report.layers:
        np.testing.assert_array_equal(layer.counts, hand[layer.name])
        np.testing.assert_allclose(layer.fractions.sum(axis=1), 1.0)
        np.testing.assert_allclose(layer.fractions, hand[layer.name] / (TOP_K * tokens[:, None]))
        assert layer.experts == tuple(f"expert_{i}" for i in range(NUM_EXPERTS)) and layer.top_k == TOP_K


def test_report_round_trips_through_json_and_formats(moe_model):
    report = routing_report(moe_model, _batches()[:1], domains=["b", "a", "c"])
    assert report.domains == ("b", "a", "c") and report.tokens[2] == 0
    for fractions in report.fractions.values():
        np.testing.assert_allclose(fractions.sum(axis=1), [1.0, 1.0, 0.0])
    again = RoutingReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.domains == report.domains
    for a, b in zip(again.layers, report.layers):
        np.testing.assert_array_equal(a.counts, b.counts)
    text = format_routing_report(report)
    assert "moe_1" in text and "moe_3" in text and "expert_3" in text and "per token" in text
    with pytest.raises(ValueError, match=r"\['a', 'b'\] are not in `domains`"):
        routing_report(moe_model, _batches()[:1], domains=["c"])


def test_model_without_moe_is_rejected():
    backbone = VLMBackbone(vocabulary_size=10, image_size=32, encoder="cnn", cnn_filters=4, hidden_dim=8,
                           num_heads=2, intermediate_dim=8, sequence_length=4, num_fusion_layers=1)
    with pytest.raises(ValueError, match="no SparseMoE layer"):
        routing_report(VLMClassifier(backbone, num_classes=2), _batches())


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(data[12:29])
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", data[16:24])


def test_heatmap_is_a_png_of_the_expected_size(tmp_path):
    counts = np.array([[30, 5, 0], [2, 40, 8]])
    report = RoutingReport(
        domains=("legal", "medical"), tokens=np.array([35, 50]), examples=np.array([2, 3]),
        layers=(LayerRouting("moe_1", ("ffn", "legal", "medical"), 1, counts),
                LayerRouting("moe_3", ("ffn", "legal", "medical"), 1, counts[::-1])),
    )
    path = save_routing_heatmap(report, tmp_path / "plots" / "routing.png", figsize=(6, 2.5), dpi=40)
    assert _png_size(path) == (240, 100)
    width, height = heatmap_size(report)
    default = save_routing_heatmap(report, tmp_path / "default.png")
    assert _png_size(default) == (round(width * 100), round(height * 100))


def test_train_config_datasets_mix_domains_in_equal_shares():
    _needs_plugins()
    config = TrainConfig(datasets=DOMAIN_DATASETS, train_size=31, eval_size=12, seed=3)
    train, held_out = load_examples(config)
    domains = {datasets()[name].spec.domain for name in DOMAIN_DATASETS}
    assert Counter(e.domain for e in train) == {d: 10 for d in domains}
    assert Counter(e.domain for e in held_out) == {d: 4 for d in domains}
    # Shuffled, not one block per dataset.
    assert len({e.domain for e in train[:10]}) > 1
    assert all(e.image.shape == (32, 32, 3) and e.image.dtype == np.uint8 for e in train + held_out)
    # Held-out examples come from the "test" splits, not the training ones.
    train_images = {e.image.tobytes() for e in train}
    assert not any(e.image.tobytes() in train_images for e in held_out)
    # Deterministic for a seed.
    again, _ = load_examples(config)
    assert [e.question for e in again] == [e.question for e in train]


def test_unknown_dataset_names_it_and_lists_the_available_ones():
    _needs_plugins()
    with pytest.raises(ValueError) as error:
        load_examples(TrainConfig(datasets=["medical_scans", "dental_xrays"]))
    message = str(error.value)
    assert "'dental_xrays'" in message
    for name in DOMAIN_DATASETS:
        assert name in message
    from kvlm.cli.train import _dataset_names

    assert _dataset_names("medical_scans, retail_shelves") == ["medical_scans", "retail_shelves"]
    with pytest.raises(argparse.ArgumentTypeError, match="dental_xrays.*legal_documents, medical_scans"):
        _dataset_names("dental_xrays")


@pytest.mark.tensorflow_only
def test_fit_on_the_domain_mix_writes_the_routing_report(tmp_path):
    _needs_plugins()
    from kvlm.training import fit

    config = TrainConfig(
        output=str(tmp_path / "run"), datasets=DOMAIN_DATASETS, train_size=240, eval_size=24, epochs=1,
        batch_size=48, vocabulary_size=120,
        overrides={"num_fusion_layers": 2, "moe": {"experts": ["legal", "medical", "retail"], "top_k": 1}},
    )
    summary = fit(config, strategy=None, verbose=0, checkpoint=False)
    out = tmp_path / "run"
    report = RoutingReport.from_dict(json.loads((out / "routing.json").read_text()))
    assert summary["routing"] == report.to_dict()
    assert report.domains == ("legal", "medical", "retail") and list(report.examples) == [8, 8, 8]
    (layer,) = report.layers
    assert layer.experts == ("legal", "medical", "retail")
    np.testing.assert_allclose(layer.fractions.sum(axis=1), 1.0)
    assert _png_size(out / "routing.png")[0] > 0
