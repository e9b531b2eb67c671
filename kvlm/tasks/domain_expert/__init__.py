"""The domain_expert task: one domain's expert trained against a frozen released base (see `task.py`)."""

from kvlm.tasks.info import Option, TaskInfo

INFO = TaskInfo(
    name="domain_expert",
    help="one domain's expert against the frozen released base (--base); writes expert/ and an installable plugin/",
    defaults=dict(train_size=6000, eval_size=1000, epochs=6, batch_size=64, learning_rate=3e-3),
    options=(
        Option("base", "kvlm_tiny_vqa", "the base the expert joins: a shipped trained preset or a preset folder "
               "with kvlm.json (scripts/release_base.py)"),
        Option("expert_name", None, "the expert's registry name (default: its domain)"),
        Option("domain", None, "the domain (default: that of --datasets, else the data folder's name)"),
    ),
)
