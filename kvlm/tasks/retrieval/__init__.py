"""The retrieval task: a CLIP / SigLIP `DualEncoder` on image-caption pairs (see `task.py`)."""

from kvlm.tasks.info import Option, TaskInfo

INFO = TaskInfo(
    name="retrieval",
    help="CLIP/SigLIP dual encoder",
    defaults=dict(train_size=4096, eval_size=512, epochs=10, batch_size=64, learning_rate=1e-3),
    options=(
        Option("loss", "clip", "contrastive loss (CLIP softmax or SigLIP sigmoid)", choices=("clip", "siglip")),
    ),
)
