"""Adapter experts: LoRA through the whole path, trained by the task, installed with no gradient
step, each example answered by exactly one expert or, when none fits, by the base."""

from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np
import pytest

from kvlm.data import make_dataset, shapes
from kvlm.domain_experts import Base, DomainExpert, install_experts
from kvlm.domain_experts.expert import LORA_FILE
from kvlm.domain_experts.report import routed_slots
from kvlm.runs import TrainConfig, load_run
from kvlm.tasks.domain_expert.task import EXPERT_DIR
from kvlm.training import fit
from kvlm.training.evaluation import answer_accuracy
from kvlm.training.examples import mix_datasets

pytestmark = [pytest.mark.long, pytest.mark.convergence]

DATASET = "retail_shelves"


@pytest.fixture(scope="module")
def base():
    return Base.load("kvlm_tiny_vqa")


def _train(out, name: str, train_size: int, epochs: int, seed: int):
    config = TrainConfig(task="domain_expert", output=str(out), datasets=[DATASET], train_size=train_size,
                         eval_size=300, epochs=epochs, seed=seed, task_options={"expert_name": name, "adapter_rank": 8})
    summary = fit(config, verbose=0, checkpoint=False)
    return DomainExpert.load(out / EXPERT_DIR), load_run(out), summary


@pytest.fixture(scope="module")
def shops(tmp_path_factory):
    """Two retail adapter experts trained by the task apart: "shop" (1,536 examples, 3 epochs) and
    "shelf" (512 examples, 1 epoch, another seed), and held-out retail examples neither saw."""
    shop = _train(tmp_path_factory.mktemp("shop"), "shop", 1536, 3, seed=0)
    shelf = _train(tmp_path_factory.mktemp("shelf"), "shelf", 512, 1, seed=1)
    held_out = mix_datasets([DATASET], 1, 300, seed=7, image_size=32)[1]
    return shop, shelf, held_out


def _logits(model, examples, tokenizer, answers):
    return model.predict(make_dataset(examples, tokenizer, answers, 32, len(examples)), verbose=0)


def test_the_task_writes_an_adapter_expert_over_all_of_its_answers(base, shops):
    (expert, run, summary), _, held_out = shops
    assert expert.kind == "adapters" and (run.path / EXPERT_DIR / LORA_FILE).is_file()
    assert {a.shape[-1] for a, _ in expert.adapters.values()} == {8}
    assert len(expert.adapters) >= 20  # image encoder, text encoder and fusion blocks
    # Its head covers every answer of the domain, the base's included (11 of retail's 15).
    assert set(expert.answers) >= set(base.answers) & {e.answer for e in held_out}
    assert expert.answer_kernel.shape == (64, len(expert.answers)) and not expert.ffn_weights
    assert expert.keys.shape == (1, 129, 128) and np.isfinite(expert.threshold)
    assert np.isfinite(expert.image_threshold) and np.isfinite(expert.question_threshold)
    assert expert.question_key.shape == (len(base.vocabulary) + len(expert.words),)
    alone = answer_accuracy(base.model, held_out, base.tokenizer, base.answers, 32)
    assert summary["expert"]["accuracy"] >= alone + 0.3, (alone, summary["expert"]["accuracy"])


def test_each_example_is_answered_by_its_expert_exactly_as_the_specialist_answers(base, shops):
    (expert, run, _), _, held_out = shops
    installed = install_experts(base, [expert])
    slots = routed_slots(installed.model, held_out, installed.tokenizer, 32)
    assert (slots == 1).mean() >= 0.95
    got = _logits(installed.model, held_out, installed.tokenizer, installed.answers)
    want = _logits(run.model, held_out, run.tokenizer, run.answers)
    columns = [installed.answers.index(a) for a in run.answers]
    np.testing.assert_allclose(got[slots == 1][:, columns], want[slots == 1], atol=1e-4)
    others = np.setdiff1d(np.arange(len(installed.answers)), columns)
    assert (got[slots == 1][:, others] < -1e8).all()  # only the expert's answers compete


def test_inputs_no_expert_fits_are_answered_by_the_base_unchanged(base, shops):
    (expert, _, _), _, held_out = shops
    installed = install_experts(base, [expert])
    tokenizer, answers = installed.tokenizer, installed.answers
    general = shapes.generate(300, seed=6)
    slots = routed_slots(installed.model, general, tokenizer, 32)
    assert (slots == 0).mean() >= 0.95
    got = _logits(installed.model, general, tokenizer, answers)
    want = _logits(base.model, general, base.tokenizer, base.answers)
    np.testing.assert_allclose(got[slots == 0, : len(base.answers)], want[slots == 0], atol=1e-4)
    # Another domain's inputs and retail images asked the base's questions fit no retail key either.
    legal = mix_datasets(["legal_documents"], 1, 300, seed=7, image_size=32)[1]
    assert (routed_slots(installed.model, legal, tokenizer, 32) == 0).mean() >= 0.95
    mismatched = [replace(e, question=g.question, answer=g.answer) for e, g in zip(held_out, general)]
    assert (routed_slots(installed.model, mismatched, tokenizer, 32) == 0).mean() >= 0.9
    # Its image gate turns away legal images asked retail questions; its question gate, retail
    # images asked legal questions (whose words the base reads as one unknown word).
    for images, questions in ((legal, held_out), (held_out, legal)):
        pairs = [replace(i, question=q.question, answer=q.answer) for i, q in zip(images, questions)]
        assert (routed_slots(installed.model, pairs, tokenizer, 32) == 0).mean() >= 0.95


def test_two_experts_of_one_domain_split_it_and_each_answers_as_its_specialist(base, shops):
    """Each retail example goes to the expert whose key fits it best; neither is averaged with the other."""
    (shop, shop_run, _), (shelf, shelf_run, _), held_out = shops
    installed = install_experts(base, [shop, shelf])
    slots = routed_slots(installed.model, held_out, installed.tokenizer, 32)
    assert (slots > 0).mean() >= 0.95
    got = _logits(installed.model, held_out, installed.tokenizer, installed.answers)
    for slot, run in ((1, shop_run), (2, shelf_run)):
        columns = [installed.answers.index(a) for a in run.answers]
        want = _logits(run.model, held_out, run.tokenizer, run.answers)
        np.testing.assert_allclose(got[slots == slot][:, columns], want[slots == slot], atol=1e-4)


def test_the_installed_model_round_trips_and_refuses_mixed_kinds(base, shops, tmp_path):
    (expert, _, _), (shelf, _, _), held_out = shops
    # An expert written before question keys beside one with them: its image and question gates stay open.
    older = replace(shelf, question_key=None, question_threshold=None, image_threshold=None)
    installed = install_experts(base, [expert, older])
    assert (routed_slots(installed.model, held_out, installed.tokenizer, 32) > 0).mean() >= 0.95
    data = make_dataset(held_out[:64], installed.tokenizer, installed.answers, 32, 64)
    installed.model.save(tmp_path / "installed.keras")
    restored = keras.saving.load_model(tmp_path / "installed.keras")
    np.testing.assert_allclose(restored.predict(data, verbose=0), installed.model.predict(data, verbose=0), atol=1e-5)
    first_kind = replace(shelf, adapters={}, name="old")
    with pytest.raises(ValueError, match=r"cannot be installed together.*shop \(adapters\), old \(ffn\)"):
        install_experts(base, [expert, first_kind])
