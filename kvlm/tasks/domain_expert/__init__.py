"""The domain_expert task: one domain's expert trained against a frozen released base (see `task.py`)."""

from kvlm.tasks.info import Option, TaskInfo, positive_int

INFO = TaskInfo(
    name="domain_expert",
    help="one domain's expert against the frozen released base (--base); writes expert/ and an installable plugin/",
    defaults=dict(train_size=6000, eval_size=1000, epochs=6, batch_size=64, learning_rate=3e-3),
    options=(
        Option("base", "kvlm_tiny_vqa", "the base the expert joins: a shipped trained preset or a preset folder "
               "with kvlm.json (scripts/release_base.py)"),
        Option("expert_name", None, "the expert's registry name (default: its domain)"),
        Option("domain", None, "the domain (default: that of --datasets, else the data folder's name)"),
        Option("kind", "adapters", "adapters: LoRA adapters through the whole path and an own answer head; "
               "ffn: a branch of each fusion feed-forward network (the first kind of expert)",
               choices=("adapters", "ffn")),
        Option("adapter_rank", 32, "rank of the LoRA adapters (--kind adapters)", type=positive_int),
        Option("adapt", None, "comma-separated parts of layer paths that take adapters (e.g. "
               "image_encoder,attention); default every Dense, EinsumDense and Conv2D layer (--kind adapters)"),
    ),
)
