"""Trains the first-party experts against the shipped base and writes them into their plugins.

    python scripts/release_experts.py                  # legal, medical and retail
    python scripts/release_experts.py --domains retail

Each expert is `kvlm train --task domain_expert` on its plugin's dataset (the task's
defaults: 6,000 examples x 6 epochs); its `expert/` folder goes to
`plugins/kvlm-<domain>/kvlm_<domain>/expert/`, which the plugin's `ExpertSpec(trained=...)`
names.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("legal", "medical", "retail")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    args = parser.parse_args()

    from kvlm.runs import TrainConfig
    from kvlm.tasks.domain_expert.task import EXPERT_DIR
    from kvlm.training import fit
    from kvlm.domain_experts.report import domain_datasets

    datasets = domain_datasets(args.domains)
    with tempfile.TemporaryDirectory(prefix="kvlm-experts-") as root:
        for domain in args.domains:
            run = Path(root) / domain
            summary = fit(TrainConfig(task="domain_expert", output=str(run), datasets=[datasets[domain]],
                                      task_options={"expert_name": domain}), verbose=2, checkpoint=False)
            target = ROOT / "plugins" / f"kvlm-{domain}" / f"kvlm_{domain}" / EXPERT_DIR
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(run / EXPERT_DIR, target)
            print(f"{domain}: specialist held-out accuracy {summary['expert']['accuracy']:.4f} -> {target}")


if __name__ == "__main__":
    main()
