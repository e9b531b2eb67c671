"""Domain experts on the shipped base: trained with the base frozen, installed with no gradient step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import keras
import numpy as np
import pytest
from harness import serve_many_without_kvlm

from kvlm.data import make_dataset, shapes
from kvlm.layers.moe.keys import key_logits, l2_normalize
from kvlm.domain_experts import Base, DomainExpert, install_experts, installed_experts
from kvlm.domain_experts.report import routed_slots
from kvlm.domain_experts.routing import routing_features
from kvlm.runs import TrainConfig, load_run
from kvlm.tasks.domain_expert.task import EXPERT_DIR, PLUGIN_DIR
from kvlm.training import fit
from kvlm.training.evaluation import answer_accuracy
from kvlm.training.examples import load_examples
from kvlm.training.loop import resolve_config

pytestmark = pytest.mark.long

DATASET = "retail_shelves"


@pytest.fixture(scope="module")
def base():
    return Base.load("kvlm_tiny_vqa")


@pytest.fixture(scope="module")
def retail(tmp_path_factory):
    """A retail FFN expert ("shop") trained through the product loop (`kvlm train --task domain_expert
    --kind ffn`): the first kind of expert, which installed plugins may still ship.

    Its tests are `convergence` tests: the expert trains to an accuracy bar (see tests/conftest.py)."""
    out = tmp_path_factory.mktemp("retail")
    config = TrainConfig(task="domain_expert", output=str(out), datasets=[DATASET], train_size=1536, eval_size=300,
                         epochs=3, task_options={"expert_name": "shop", "kind": "ffn"})
    summary = fit(config, verbose=0, checkpoint=False)
    return out, summary, load_examples(resolve_config(config))[1]


def _routed(model, examples, tokenizer, answers, image_size) -> np.ndarray:
    """Per example, the key each SparseMoE block (as `SparseMoE` routes a sequence) and the answer
    head pick: int `(examples, blocks + 1)`."""
    from kvlm.layers import FusionBlock

    blocks = [layer for layer in model.layers if isinstance(layer, FusionBlock)]
    head = model.get_layer("answer_head")
    picks = []
    # One batch: every call has the same shapes, so eager backends (JAX) compile each op once.
    for inputs, _ in make_dataset(examples, tokenizer, answers, image_size, len(examples)):
        features, pooled, mask = routing_features(model, inputs)
        rows = []
        for block, x in zip(blocks, features):
            keys = keras.ops.convert_to_tensor(block.ffn.router_keys)
            unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
            mean = (unit * mask[..., None]).sum(1)
            rows.append(np.argmax(keras.ops.convert_to_numpy(key_logits(l2_normalize(mean), keys)), axis=-1))
        rows.append(keras.ops.convert_to_numpy(head.routed_expert(pooled)))
        picks.append(np.stack(rows, axis=1))
    return np.concatenate(picks)


def test_the_shipped_base_loads_offline_with_its_fingerprint_and_keys(base):
    assert base.metrics["accuracy"] >= 0.95
    assert base.keys.shape == (base.model.backbone.num_fusion_layers + 1, 65, 64)
    general = shapes.generate(300, seed=5)
    assert answer_accuracy(base.model, general, base.tokenizer, base.answers, base.image_size) >= 0.95
    shipped = base.fingerprint
    kernel = base.model.get_layer("logits").kernel
    original = keras.ops.convert_to_numpy(kernel)
    kernel.assign(original + 1e-3)
    assert base.fingerprint != shipped  # any change to the weights changes the fingerprint
    kernel.assign(original)
    assert base.fingerprint == shipped


@pytest.mark.convergence
def test_the_task_writes_an_expert_with_what_a_new_domain_needs(base, retail):
    out, summary, held_out = retail
    expert = DomainExpert.load(out / EXPERT_DIR)
    assert (expert.name, expert.domain, expert.base) == ("shop", "retail", base.fingerprint)
    # Retail's words and answers are not the base's: the expert brings rows and columns for them.
    assert len(expert.words) >= 5 and not set(expert.words) & set(base.vocabulary)
    assert len(expert.answers) >= 3 and not set(expert.answers) & set(base.answers)
    assert expert.word_embeddings.shape == (len(expert.words), 64)
    assert expert.keys.shape == base.keys.shape
    before = answer_accuracy(base.model, held_out, base.tokenizer, base.answers, base.image_size)
    assert summary["expert"]["accuracy"] == expert.metrics["accuracy"] >= before + 0.15
    # The run folder is a classifier run: its model reloads and scores what the expert reports.
    run = load_run(out)
    assert answer_accuracy(run.model, held_out, run.tokenizer, run.answers, 32) == pytest.approx(
        expert.metrics["accuracy"], abs=1e-6
    )
    assert (out / PLUGIN_DIR / "pyproject.toml").is_file()


@pytest.mark.convergence
def test_installing_routes_each_domain_to_its_expert_with_no_training(base, retail):
    out, _, held_out = retail
    expert = DomainExpert.load(out / EXPERT_DIR)
    installed = install_experts(base, [expert])
    tokenizer, answers = installed.tokenizer, installed.answers
    assert answers[: len(base.answers)] == base.answers and set(expert.answers) <= set(answers)

    own = _routed(installed.model, held_out, tokenizer, answers, 32)
    assert (own == 1).mean() >= 0.95, (own == 1).mean(axis=0)
    accuracy = answer_accuracy(installed.model, held_out, tokenizer, answers, 32)
    assert accuracy >= 0.95 * expert.metrics["accuracy"]

    general = shapes.generate(300, seed=6)
    routed = _routed(installed.model, general, tokenizer, answers, 32)
    to_base = (routed == 0).all(axis=1)
    assert to_base.mean() >= 0.95
    # Where every block routes to the general expert, the model is the base (its logits, unchanged).
    data = make_dataset(general, tokenizer, answers, 32, 300)
    new = installed.model.predict(data, verbose=0)
    old = base.model.predict(make_dataset(general, base.tokenizer, base.answers, 32, 300), verbose=0)
    np.testing.assert_allclose(new[to_base, : len(base.answers)], old[to_base], atol=1e-4)
    assert (new[to_base, len(base.answers):] < -1e8).all()


@pytest.mark.convergence
def test_installed_model_round_trips_as_keras(base, retail, tmp_path):
    out, _, held_out = retail
    installed = install_experts(base, [DomainExpert.load(out / EXPERT_DIR)])
    data = make_dataset(held_out[:64], installed.tokenizer, installed.answers, 32, 64)
    path = tmp_path / "installed.keras"
    installed.model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored.predict(data, verbose=0), installed.model.predict(data, verbose=0), atol=1e-5)


@pytest.mark.convergence
def test_an_expert_for_another_base_is_refused_naming_both(base, retail):
    expert = DomainExpert.load(retail[0] / EXPERT_DIR)
    with pytest.raises(ValueError, match=f"trained for the base 0123456789abcdef, but this base is {base.fingerprint}"):
        install_experts(base, [replace(expert, base="0123456789abcdef")])
    with pytest.raises(ValueError, match="installed once"):
        install_experts(base, [expert, expert])


@pytest.mark.convergence
def test_the_plugin_installs_with_pip_and_its_expert_routes(retail, tmp_path):
    """The written plugin distribution, pip-installed, is discovered and installs by name."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input", "-q",
         "--disable-pip-version-check", "--target", str(site), str(retail[0] / PLUGIN_DIR)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    script = (
        "import json; from kvlm.domain_experts import Base, install_experts, installed_experts;"
        "import kvlm.testing, kvlm_shop_expert;"
        "kvlm.testing.check_plugin(kvlm_shop_expert, distribution='kvlm-shop-expert');"
        "m = install_experts(Base.load(), ['shop']);"
        "print(json.dumps({'experts': m.experts, 'trained': [e.name for e in installed_experts()]}))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["experts"] == ["shop"] and "shop" in found["trained"]


@pytest.fixture(scope="module")
def shipped(base):
    """The base with the first-party plugins' trained experts installed, and held-out examples of
    the general task and of each expert's domain (no training: runs on every backend)."""
    from kvlm.domain_experts.report import held_out_examples

    try:
        installed = install_experts(base, "installed")
    except ValueError as error:
        pytest.skip(f"first-party plugins not installed: {error}")
    if not installed.experts:
        pytest.skip("no trained expert is installed")
    return installed, held_out_examples(base, installed, 48, seed=3)


def test_shipped_experts_install_route_and_predict_on_every_backend(base, shipped, tmp_path):
    installed, held_out = shipped
    tokenizer, answers = installed.tokenizer, installed.answers
    names = ["general", *installed.experts]
    for domain, examples in held_out.items():
        own = names.index(next((n for n in names if installed.domains.get(n) == domain), "general"))
        if any(e.kind == "adapters" for e in installed_experts(installed.experts)):
            routed = routed_slots(installed.model, examples, tokenizer, base.image_size)
        else:
            routed = _routed(installed.model, examples, tokenizer, answers, base.image_size)
        assert (routed == own).mean() >= 0.95, (domain, (routed == own).mean(axis=0))
        accuracy = answer_accuracy(installed.model, examples, tokenizer, answers, base.image_size)
        alone = answer_accuracy(base.model, examples, base.tokenizer, base.answers, base.image_size)
        # The general task keeps the base's answers; each domain gains well over chance from its expert.
        assert accuracy >= (alone - 0.02 if domain == "general" else alone + 0.3), (domain, alone, accuracy)
    if any(e.kind == "adapters" for e in installed_experts(installed.experts)):
        # One domain's image asked another domain's question: no expert was trained for the pair, so
        # the image gate of the question's expert or the question gate of the image's sends it to the base.
        to_base = {}
        for image_domain, images in held_out.items():
            for question_domain, questions in held_out.items():
                if image_domain != question_domain:
                    pairs = [replace(i, question=q.question, answer=q.answer) for i, q in zip(images, questions)]
                    to_base[image_domain, question_domain] = (routed_slots(installed.model, pairs, tokenizer,
                                                                           base.image_size) == 0).mean()
        assert np.mean(list(to_base.values())) >= 0.95 and min(to_base.values()) >= 0.8, to_base
    examples = [e for group in held_out.values() for e in group][::3]
    data = make_dataset(examples, tokenizer, answers, base.image_size, len(examples))
    path = tmp_path / "installed.keras"
    installed.model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored.predict(data, verbose=0), installed.model.predict(data, verbose=0), atol=1e-4)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="torch cannot export; the .keras file exports "
                    "from TensorFlow or JAX")
def test_the_installed_model_exports_with_a_dynamic_batch_and_answers_without_kvlm(base, shipped, tmp_path):
    """The exported SavedModel (tensorflow + tensorflow_text only) answers every domain as the model does,
    at two batch sizes: the expert capacity follows the batch, on JAX as on TensorFlow. With adapter
    experts it also says which expert answered, and `choose_experts` restricts them per example."""
    import tensorflow as tf

    from kvlm.export.savedmodel import export_model
    from kvlm.domain_experts.report import write_installed_run

    installed, held_out = shipped
    run = write_installed_run(installed, tmp_path / "installed", eval_size=50)
    version = export_model(run, tmp_path / "models", "experts")
    examples = [e for group in held_out.values() for e in group[:12]]
    logits = installed.model.predict(make_dataset(examples, installed.tokenizer, installed.answers, 32, 64), verbose=0)
    expected = [installed.answers[i] for i in logits.argmax(-1)]
    images = [tf.io.encode_png(np.asarray(e.image, np.uint8)).numpy() for e in examples]
    questions = [e.question for e in examples]
    first = installed.experts[0]
    chosen = ["" if i % 2 else first for i in range(len(examples))]  # the base alone, or one named expert
    served, five, restricted, unknown = serve_many_without_kvlm(version, [
        (images, questions, None), (images[:5], questions[:5], None), (images, questions, chosen),
        (images[:1], questions[:1], ["nope"]),
    ], tmp_path)
    assert served["answers"] == expected and five["answers"] == expected[:5]
    new_answers = set(installed.answers[len(base.answers):])
    assert set(expected) & new_answers
    if "experts" not in served:
        return  # FFN experts route per token: no one expert answers an example
    # Which expert answered: the model's own routing, each with its posterior weight.
    slots = routed_slots(installed.model, examples, installed.tokenizer, 32)
    assert served["experts"] == [(["base", *installed.experts])[s] for s in slots]
    assert all(0.5 <= w <= 1.0 for w in served["expert_weights"])
    # Experts chosen per example: as the layer answers with the same experts allowed.
    assert restricted["experts"] == [first if c and s == 1 else "base" for c, s in zip(chosen, slots)]
    allowed = np.array([[bool(c) and e == 0 for e in range(len(installed.experts))] for c in chosen])
    batch = next(iter(make_dataset(examples, installed.tokenizer, installed.answers, 32, 64)))[0]
    inputs = {name: np.asarray(value) for name, value in batch.items()}
    logits = installed.model.get_layer("adapter_experts").answer(inputs, allowed)[0]
    assert restricted["answers"] == [installed.answers[i] for i in keras.ops.convert_to_numpy(logits).argmax(-1)]
    assert set(restricted["answers"][1::2]) <= set(base.answers)
    assert "the experts are " + ", ".join(installed.experts) in unknown["error"] and "nope" in unknown["error"]
