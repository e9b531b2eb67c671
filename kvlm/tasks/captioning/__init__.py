"""The captioning task: image -> caption with a `Captioner` (see `task.py`)."""

from kvlm.tasks.info import TaskInfo

INFO = TaskInfo(
    name="captioning",
    help="image -> caption",
    defaults=dict(train_size=3072, eval_size=512, epochs=4, batch_size=32, learning_rate=2e-3),
)
