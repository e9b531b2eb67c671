"""The task registry: every task listed without Keras, old run folders, and a new task added through it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import kvlm.tasks
from kvlm.runs import TrainConfig, read_config
from kvlm.tasks import get_task, task_info, task_names

pytestmark = pytest.mark.long

TASKS = ("vqa", "retrieval", "captioning", "distillation", "rag", "domain_expert")
# Held-out accuracy of the docs' counting task above the most frequent count's share.
COUNT_MARGIN = 0.15
DOCS = Path(__file__).resolve().parents[2] / "docs" / "tasks.md"


def test_every_task_is_listed_without_importing_keras():
    code = (
        "import json, sys\n"
        "import kvlm.tasks, kvlm.runs, kvlm.cli.train\n"
        "infos = [kvlm.tasks.task_info(n) for n in kvlm.tasks.task_names()]\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'jax', 'torch', 'keras_hub') if m in sys.modules]\n"
        "print(json.dumps({'names': [i.name for i in infos], 'heavy': heavy}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    listed = json.loads(result.stdout.strip().splitlines()[-1])
    assert listed == {"names": list(TASKS), "heavy": []}


def test_each_task_declares_its_defaults_and_loads_its_task():
    from kvlm.training.distribution import ALL_STRATEGIES

    for name in task_names():
        info, task = task_info(name), get_task(name)
        assert info.name == name and task.info is info and info.help
        assert {"epochs", "batch_size", "learning_rate"} <= set(info.defaults), name
        assert task.export_description.startswith("signature "), name
    assert task_info("vqa").defaults == dict(train_size=36000, eval_size=2000, epochs=8, batch_size=64, learning_rate=2e-3)
    assert task_info("vqa").strategies == ALL_STRATEGIES
    assert TrainConfig(task="rag").options == {
        "top_k": 3, "train_catalogues": 500, "retriever_epochs": 3, "index_store": 10000, "index_dir": None,
    }
    with pytest.raises(ValueError, match="`task` must be one of vqa, retrieval, captioning, distillation, rag"):
        get_task("detection")


def test_run_json_with_flat_task_fields_still_loads(tmp_path):
    old = {  # run.json as written before task options moved into `task_options`
        "output": "runs/rag", "preset": "kvlm_tiny", "encoder": "cnn", "data_dir": None, "train_size": 12000,
        "eval_size": 1000, "eval_fraction": 0.2, "epochs": 8, "batch_size": 64, "learning_rate": 1e-3,
        "weight_decay": 1e-4, "vocabulary_size": 400, "augment": False, "seed": 0, "overrides": {},
        "datasets": None, "task": "rag", "loss": "clip", "teacher": None, "alpha": 0.1, "temperature": 3.0,
        "top_k": 5, "train_catalogues": 40, "retriever_epochs": 2, "index_store": 10003, "index_dir": None,
    }
    (tmp_path / "run.json").write_text(json.dumps(old))
    config = read_config(tmp_path)
    assert (config.task, config.train_size, config.learning_rate) == ("rag", 12000, 1e-3)
    assert config.task_options == {
        "top_k": 5, "train_catalogues": 40, "retriever_epochs": 2, "index_store": 10003, "index_dir": None,
    }
    (tmp_path / "run.json").write_text(json.dumps({**old, "task": "retrieval", "loss": "siglip"}))
    assert read_config(tmp_path).task_options == {"loss": "siglip"}
    del old["task"]  # runs from before there were tasks
    (tmp_path / "run.json").write_text(json.dumps(old))
    assert (read_config(tmp_path).task, read_config(tmp_path).task_options) == ("vqa", {})


def _docs_files() -> dict[str, str]:
    """The files of the docs' counting task, by name."""
    text = DOCS.read_text(encoding="utf-8")
    files = {}
    for name in ("__init__.py", "task.py"):
        match = re.search(rf"`kvlm/tasks/counting/{re.escape(name)}`:\n\n```python\n(.*?)```", text, re.S)
        assert match, name
        files[name] = match.group(1)
    return files


@pytest.mark.tensorflow_only
def test_a_task_added_through_the_registry_trains_with_the_shared_loop(tmp_path, monkeypatch, capsys):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("trains on the TensorFlow backend only (slow elsewhere)")
    from kvlm.cli import main
    from kvlm.runs import load_run
    from kvlm.training import evaluate, fit

    package = tmp_path / "src" / "counting_task"
    package.mkdir(parents=True)
    for name, source in _docs_files().items():
        (package / name).write_text(source.replace("kvlm.tasks.counting", "counting_task"))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setitem(kvlm.tasks.TASKS, "counting", "counting_task")  # the one registry line

    with pytest.raises(ValueError, match="`max_shapes` must be between 1 and 3"):
        fit(TrainConfig(task="counting", output=str(tmp_path / "bad"), task_options={"max_shapes": 4}))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    # argparse wraps help text at the terminal's width, also inside "->": compare without spaces.
    assert "counting:image->numberofshapes" in "".join(capsys.readouterr().out.split())

    out = tmp_path / "run"
    assert main(["train", "--task", "counting", "--output", str(out), "--no-tensorboard", "--train-size", "1024",
                 "--epochs", "4", "--max-shapes", "3"]) == 0
    assert "trained counting on 1024 examples" in capsys.readouterr().out
    run = load_run(out)
    assert run.config.task_options == {"max_shapes": 3} and run.answers == ["one", "three", "two"]
    report = evaluate(out)
    held_out = get_task("counting").evaluation_examples(run)
    assert report["examples"] == 256 == len(held_out)
    shares = [np.mean([e.answer == a for e in held_out]) for a in run.answers]
    # Counting is learned first (see the README's learning curve): well above the most frequent count.
    assert report["accuracy"] > max(shares) + COUNT_MARGIN, (report["accuracy"], shares)

