"""`kvlm train --image-encoder PRESET`: a VQA run on a keras-hub vision preset saved to a folder, its
export answering raw image bytes and text with only tensorflow + tensorflow_text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from harness import serve_many_without_kvlm
from hub_presets import SIZE, save_preset

from kvlm.cli import main
from kvlm.data import make_dataset, shapes
from kvlm.export import export_model
from kvlm.hub import HubImageEncoder, preset_image_size
from kvlm.runs import load_run

pytestmark = pytest.mark.tensorflow_only


def test_a_vqa_run_on_a_vit_preset_trains_exports_and_serves_raw_bytes(tmp_path):
    folder, _ = save_preset("vit", tmp_path / "vit_preset")
    assert preset_image_size(folder) == SIZE
    out = tmp_path / "run"
    code = main(["train", "--task", "vqa", "--image-encoder", folder, "--output", str(out), "--no-tensorboard",
                 "--train-size", "2048", "--eval-size", "256", "--epochs", "2"])
    assert code == 0
    run = load_run(out)
    assert isinstance(run.model.backbone.get_layer("image_encoder"), HubImageEncoder)
    assert run.config.overrides["image_encoder"] == folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] > 0.3  # 17 answers: chance is well below

    version = export_model(out, tmp_path / "models", "vqa")
    examples = shapes.generate(16, seed=99)
    logits = run.model.predict(make_dataset(examples, run.tokenizer, run.answers, SIZE, 16), verbose=0)
    images = [tf.io.encode_png(np.asarray(e.image, np.uint8)).numpy() for e in examples]
    (served,) = serve_many_without_kvlm(version, [(images, [e.question for e in examples], None)], tmp_path)
    assert served["answers"] == [run.answers[i] for i in logits.argmax(-1)]


def test_a_preset_that_states_no_image_size_is_refused_by_name(tmp_path):
    from hub_presets import resnet

    folder = tmp_path / "resnet_preset"
    resnet().save_to_preset(str(folder))
    with pytest.raises(ValueError, match="states no image size"):
        preset_image_size(str(folder))
