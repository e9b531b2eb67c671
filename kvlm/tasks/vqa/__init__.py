"""The vqa task: image + question -> answer with a `VLMClassifier` (see `task.py`)."""

from kvlm.tasks.info import TaskInfo

INFO = TaskInfo(
    name="vqa",
    help="image+question -> answer",
    defaults=dict(train_size=36000, eval_size=2000, epochs=8, batch_size=64, learning_rate=2e-3),
    strategies=("auto", "one_device", "mirrored", "multi_worker", "data_parallel", "expert_parallel"),
)
