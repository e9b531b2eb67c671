"""The run folder: its file names, `TrainConfig` (`run.json`) and `load_run`.

A run folder, written by `kvlm train` (`kvlm.training.fit`), holds `model.keras`, `run.json`,
`vocabulary.txt`, `answers.txt` (classifier tasks), and while training `checkpoint.keras`,
`history.csv`, `training_curves.png`, `backup/` and `logs/`, plus what its task adds (routing,
distillation or rag reports). Export, serving and the CLI read runs through this module; it
imports Keras only inside `load_run`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvlm.tasks import task_info

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
VOCABULARY_FILE = "vocabulary.txt"
ANSWERS_FILE = "answers.txt"
CHECKPOINT_FILE = "checkpoint.keras"
HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"
SUMMARY_FILE = "summary.json"
ROUTING_FILE = "routing.json"
ROUTING_PLOT = "routing.png"
BACKUP_DIR = "backup"
LOGS_DIR = "logs"


@dataclass
class TrainConfig:
    """Everything a training run needs; stored as `run.json` beside the model.

    Sizes left at None take the task's defaults (`kvlm.tasks.task_info(task).defaults`);
    `task_options` holds the options only the task uses (its `TaskInfo.options`, e.g.
    the retrieval `loss` or the distillation `teacher`), filled with their defaults.
    """

    task: str = "vqa"
    output: str = "runs/vqa"
    preset: str = "kvlm_tiny"
    encoder: str = "cnn"
    data_dir: str | None = None
    # Plugin datasets (`kvlm.experts.datasets()` names) to mix in equal shares instead of shapes.
    datasets: list[str] | None = None
    train_size: int | None = None
    eval_size: int | None = None
    eval_fraction: float = 0.2
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    vocabulary_size: int = 400
    augment: bool = False
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The `run.json` content."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from `run.json` content; runs written with the task options as top-level
        keys (`loss`, `teacher`, `top_k`, ...) load with those of their task in `task_options`."""
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in names})
        legacy = {k: v for k, v in data.items() if k not in names}
        if legacy:
            own = {option.name for option in task_info(config.task).options}
            config.task_options = {**{k: v for k, v in legacy.items() if k in own}, **config.task_options}
        return config

    @property
    def options(self) -> dict[str, Any]:
        """The task's options: `task_options` over the task's defaults (unknown names raise)."""
        return task_info(self.task).resolve_options(self.task_options)


def read_config(run_dir: str | Path) -> TrainConfig:
    """The `TrainConfig` of a run folder.

    Raises:
        FileNotFoundError: The folder has no `run.json`.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {RUN_FILE} in {run_dir}: train a model there first (`kvlm train`).")
    return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def read_task(run_dir: str | Path) -> str:
    """The task of a run folder (`vqa` for runs written before tasks)."""
    return read_config(run_dir).task


def write_config(out: str | Path, config: TrainConfig) -> Path:
    """Writes `run.json`; returns its path."""
    path = Path(out) / RUN_FILE
    path.write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
    return path


def write_run_files(out: str | Path, config: TrainConfig, vocabulary: list[str], answers: list[str] | None) -> None:
    """`vocabulary.txt`, `run.json` and (when `answers` is not None) `answers.txt`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / VOCABULARY_FILE).write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    if answers is not None:
        (out / ANSWERS_FILE).write_text("\n".join(answers) + "\n", encoding="utf-8")
    write_config(out, config)


def read_vocabulary(run_dir: str | Path) -> list[str]:
    """The tokens of a run's `vocabulary.txt`."""
    path = Path(run_dir) / VOCABULARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {VOCABULARY_FILE} in {run_dir}.")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def read_answers(run_dir: str | Path) -> list[str]:
    """The labels of a classifier run's `answers.txt` (`[]` for runs without one)."""
    path = Path(run_dir) / ANSWERS_FILE
    return path.read_text(encoding="utf-8").split() if path.is_file() else []


@dataclass
class Run:
    """A trained run folder, loaded.

    Attributes:
        model: The task's model (`VLMClassifier`, `DualEncoder`, `Captioner`, `RetrievalAugmentedVLM`).
        tokenizer: The run's WordPiece tokenizer, at the model's sequence length.
        answers: The label of each logit of a classifier run; `[]` for the other tasks.
        config: The run's `TrainConfig`.
        path: The run folder.
    """

    model: Any
    tokenizer: Any
    answers: list[str]
    config: TrainConfig
    path: Path


def load_run(run_dir: str | Path) -> Run:
    """Loads the model, tokenizer, answers and config of a run folder of any task.

    Raises:
        FileNotFoundError: The folder has no `model.keras` (or no `run.json`).
    """
    from kvlm.data import make_tokenizer
    from kvlm.experts import load_model

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).exists():
        raise FileNotFoundError(f"No {MODEL_FILE} in {run_dir}: train a model there first (`kvlm train`).")
    config = read_config(run_dir)
    model = load_model(run_dir / MODEL_FILE)  # registers plugin experts first
    # DualEncoder and Captioner keep their sizes on the model; classifiers on their backbone or inputs.
    if hasattr(model, "sequence_length"):
        sequence_length = model.sequence_length
    else:
        from kvlm.models.classifier import classifier_sizes

        sequence_length = classifier_sizes(model)[1]
    tokenizer = make_tokenizer(read_vocabulary(run_dir), sequence_length)
    return Run(model, tokenizer, read_answers(run_dir), config, run_dir)
