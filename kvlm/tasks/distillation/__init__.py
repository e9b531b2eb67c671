"""The distillation task: a trained vqa run distilled into a small dense student (see `task.py`)."""

from kvlm.tasks.info import Option, TaskInfo, positive_int

# TrainConfig fields that describe the data; a student takes them from its teacher's run.json.
DATA_FIELDS = ("data_dir", "datasets", "train_size", "eval_size", "eval_fraction", "seed", "vocabulary_size")
PRESETS = ("kvlm_tiny", "kvlm_small", "kvlm_base")


INFO = TaskInfo(
    name="distillation",
    help="a small dense student from a trained VQA teacher (--teacher)",
    defaults=dict(epochs=8, batch_size=64, learning_rate=2e-3),
    options=(
        Option("teacher", None, "the teacher's run folder (a `kvlm train --task vqa` run); the student trains on "
               "its data, sizes, seed, vocabulary and answers"),
        Option("alpha", 0.1, "weight of the label cross-entropy; the soft-target KL gets 1 - alpha", type=float),
        Option("temperature", 3.0, "softmax temperature of the soft targets", type=float),
        Option("student_preset", "kvlm_tiny", "the dense student's preset (with the teacher's image size and "
               "sequence length)", choices=PRESETS, config_field="preset"),
        Option("student_fusion_layers", 1, "fusion blocks of the student", type=positive_int,
               config_field="overrides.num_fusion_layers"),
    ),
    refuses=("data_dir", "datasets", "train_size", "eval_size"),
    refusal="trains on its teacher run's data and sizes",
)
